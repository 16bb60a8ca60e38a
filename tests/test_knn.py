"""Blockwise kNN against a brute-force oracle; approximate recall measured honestly."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, random_data

from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.errors import KnnConfigError
from index_builder import knn
from index_builder.knn import SYMMETRIC_MIN_N, KnnSpec, self_knn, set_recall, use_symmetric


def brute_force(u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = u.astype(np.float64) @ u.T.astype(np.float64)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


@pytest.mark.parametrize("block_size", [1, 33, 5000])
def test_exact_self_knn_equals_brute_force(block_size):
    u, _ = normalize_rows(random_data(500, 24, seed=1))
    res = self_knn(u, 7, KnnSpec(), block_size)
    sims, ids = brute_force(u, 7)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.sims, sims, atol=1e-5)
    assert res.recall is None


def test_self_knn_uses_the_symmetric_kernel_by_size(monkeypatch):
    calls = []
    real = knn.symmetric_self_knn
    # a spy, not a seam: which route self_knn took is not part of its result
    monkeypatch.setattr(knn, "symmetric_self_knn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert not use_symmetric(SYMMETRIC_MIN_N - 1) and use_symmetric(SYMMETRIC_MIN_N)
    assert use_symmetric(10, "symmetric") and not use_symmetric(10**7, "faiss")
    u, _ = normalize_rows(random_data(300, 16, seed=5))
    faiss_path = self_knn(u, 5, KnnSpec(exact_kernel="faiss"), 64)
    assert not calls
    sym_path = self_knn(u, 5, KnnSpec(exact_kernel="symmetric"), 64)
    assert calls and sym_path.recall is None
    np.testing.assert_array_equal(sym_path.ids, faiss_path.ids)
    np.testing.assert_allclose(sym_path.sims, faiss_path.sims, atol=1e-6)
    with pytest.raises(ValueError, match="exact_kernel"):
        KnnSpec(exact_kernel="fast")


def test_approximate_knn_reports_recall_against_exact():
    u, _ = normalize_rows(clustered_data(3000, 32, seed=2))
    exact = self_knn(u, 10, KnnSpec(), 512)
    low = self_knn(u, 10, KnnSpec(method="IVF64,Flat", nprobe=1, recall_sample=3000), 512)
    high = self_knn(u, 10, KnnSpec(method="IVF64,Flat", nprobe=64, recall_sample=3000), 512)
    # the reported recall is the true recall over the whole (fully sampled) set
    assert low.recall == pytest.approx(set_recall(low.ids, exact.ids))
    assert high.recall > 0.99  # all lists probed: only ties between duplicate rows differ
    assert low.recall < high.recall
    hnsw = self_knn(u, 10, KnnSpec(method="HNSW16", ef_search=64, recall_sample=200), 512)
    assert 0.5 < hnsw.recall <= 1.0 and hnsw.recall_sample == 200


def test_bad_factory_and_too_few_training_rows_are_clear_errors():
    u, _ = normalize_rows(random_data(50, 8))
    with pytest.raises(KnnConfigError, match="cannot build index"):
        self_knn(u, 3, KnnSpec(method="NotAnIndex"), 16)
    with pytest.raises(KnnConfigError, match="training"):
        self_knn(u, 3, KnnSpec(method="IVF1024,Flat"), 16)
