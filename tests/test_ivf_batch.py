"""Batch search over inverted lists against row-by-row IVF search and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, random_data
from knn_oracle import TIE, assert_exact_topk, brute_force

from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.errors import KnnConfigError
from aqe_retrieval.faiss_search import exact_knn
from index_builder.ivf_batch import batch_self_knn
from index_builder.knn import KnnSpec, build_index, self_knn, set_recall


@pytest.mark.parametrize(("nprobe", "workers"), [(1, 2), (4, 1), (32, 2)])
def test_batch_lists_finds_what_row_by_row_ivf_search_finds(nprobe, workers):
    u, _ = normalize_rows(clustered_data(2000, 32, seed=2))
    plain = self_knn(u, 10, KnnSpec(method="IVF32,Flat", nprobe=nprobe, recall_sample=500), 512)
    batch = self_knn(
        u,
        10,
        KnnSpec(method="IVF32,Flat", nprobe=nprobe, recall_sample=500, batch_lists=True),
        512,
        workers=workers,
    )
    # same candidates (the nprobe nearest lists), so the same top-k values row by row...
    np.testing.assert_allclose(batch.sims, plain.sims, atol=TIE)
    # ...and the same sets except inside ties
    differ = [i for i in range(len(u)) if set(batch.ids[i]) != set(plain.ids[i])]
    s = brute_force(u)
    for i in differ:
        extra = np.setdiff1d(batch.ids[i], plain.ids[i])
        assert np.abs(s[i, extra] - batch.sims[i, -1]).max() <= TIE
    assert batch.recall == pytest.approx(plain.recall, abs=0.002)
    assert batch.index is not None and batch.index.ntotal == len(u)
    if nprobe == 32:  # all lists probed: exact
        assert_exact_topk(u, batch.ids, batch.sims, 10)


def test_batch_lists_sorted_exact_cosines_and_chunked_lists():
    u, _ = normalize_rows(random_data(800, 16, seed=8))
    spec = KnnSpec(method="IVF4,Flat", nprobe=4, batch_lists=True, train_size=800)
    index = build_index(u, spec, 100, add=False)
    sims, ids = batch_self_knn(index, u, 5, 4, 100, tile=8)  # lists split into chunks of 64 / size rows
    assert index.ntotal == len(u)
    assert_exact_topk(u, ids, sims, 5)
    assert set_recall(ids, exact_knn(u, u, 5)[1]) == 1.0


def test_batch_lists_refuses_what_it_cannot_search():
    u, _ = normalize_rows(random_data(2000, 16, seed=9))
    with pytest.raises(KnnConfigError, match="IVF<nlist>,Flat"):
        self_knn(u, 5, KnnSpec(method="IVF16,PQ4", batch_lists=True), 500)
    with pytest.raises(KnnConfigError, match="IVF<nlist>,Flat"):
        self_knn(u, 5, KnnSpec(method="HNSW8", batch_lists=True), 500)
    with pytest.raises(ValueError, match="batch_lists"):
        KnnSpec(batch_lists=True)
