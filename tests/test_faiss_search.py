"""Per-call FAISS search: exact kNN against brute force, parameters that never touch the index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import random_data

from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.faiss_search import (
    BLAS_MAX_QUERIES,
    bitmap_selector,
    blas_knn,
    exact_knn,
    flat_rows,
    parameters_with_selector,
    search_parameters,
    serving_knn,
)

D = 16


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return normalize_rows(random_data(500, D, seed=4))[0]


def ivf(rows: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(D, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(rows)
    index.add(rows)
    return index


@pytest.mark.parametrize("k", [1, 7, 500])
def test_exact_knn_equals_brute_force(rows, k):
    xq = rows[:40] + 0.05
    sims, ids = exact_knn(xq, rows, k)
    s = xq.astype(np.float64) @ rows.T.astype(np.float64)
    assert sims.shape == ids.shape == (40, k)
    np.testing.assert_array_equal(ids, np.argsort(-s, axis=1, kind="stable")[:, :k])  # no ties here
    np.testing.assert_allclose(sims, np.take_along_axis(s, ids, axis=1), atol=1e-5)


def test_exact_knn_takes_any_float_layout(rows):
    sims, ids = exact_knn(rows[:5].astype(np.float64), np.asfortranarray(rows), 3)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-6)


def test_search_parameters_per_index_type(rows):
    index = ivf(rows)
    params = search_parameters(index, 8, None)
    assert isinstance(params, faiss.SearchParametersIVF) and params.nprobe == 8
    assert search_parameters(index, None, None) is None
    hnsw = faiss.IndexHNSWFlat(D, 8, faiss.METRIC_INNER_PRODUCT)
    params = search_parameters(hnsw, None, 77)
    assert isinstance(params, faiss.SearchParametersHNSW) and params.efSearch == 77
    assert search_parameters(hnsw, None, None) is None
    assert search_parameters(faiss.IndexFlatIP(D), 8, 77) is None


def test_per_call_nprobe_changes_the_answer_and_never_the_index(rows):
    index = ivf(rows)
    before = index.nprobe
    xq = rows[:50] + 0.05
    _, all_lists = index.search(xq, 10, params=search_parameters(index, 8, None))
    assert index.nprobe == before == 1
    np.testing.assert_array_equal(all_lists, exact_knn(xq, rows, 10)[1])  # every list probed: exact
    _, one_list = index.search(xq, 10)
    assert (one_list != all_lists).any()


def test_the_bitmap_selector_admits_exactly_the_masked_rows(rows):
    mask = np.zeros(len(rows), dtype=bool)
    mask[[0, 3, 8, 9, 250, 499]] = True
    sel = bitmap_selector(mask)
    assert [bool(sel.is_member(i)) for i in range(len(rows))] == mask.tolist()
    flat = faiss.IndexFlatIP(D)
    flat.add(rows)
    _, ids = flat.search(rows[:4], 10, params=parameters_with_selector(flat, sel, None, None))
    assert set(ids[ids >= 0].tolist()) <= set(np.flatnonzero(mask).tolist())
    assert (ids >= 0).sum(axis=1).tolist() == [6, 6, 6, 6]  # all six admitted rows, then -1


def test_selector_parameters_keep_the_index_setting_unless_given(rows):
    index = ivf(rows)
    index.nprobe = 3
    sel = bitmap_selector(np.ones(len(rows), dtype=bool))
    assert parameters_with_selector(index, sel, None, None).nprobe == 3
    assert parameters_with_selector(index, sel, 8, None).nprobe == 8
    hnsw = faiss.IndexHNSWFlat(D, 8, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = 21
    assert parameters_with_selector(hnsw, sel, None, None).efSearch == 21
    assert parameters_with_selector(hnsw, sel, None, 40).efSearch == 40
    assert type(parameters_with_selector(faiss.IndexFlatIP(D), sel, 8, 40)) is faiss.SearchParameters


@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("k", [1, 7, 500, 600])
@pytest.mark.parametrize("block_rows", [64, 500, 16384])
def test_blas_knn_equals_brute_force_block_by_block(rows, m, k, block_rows):
    xq = rows[:m] + 0.05
    sims, ids = blas_knn(xq, rows, k, block_rows=block_rows)
    s = xq.astype(np.float64) @ rows.T.astype(np.float64)
    want = min(k, len(rows))
    assert sims.shape == ids.shape == (m, want) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.argsort(-s, axis=1, kind="stable")[:, :want])
    np.testing.assert_allclose(sims, np.take_along_axis(s, ids, axis=1), atol=1e-5)


@pytest.mark.parametrize("keep", [0, 3, 250])
def test_blas_knn_with_a_mask_returns_only_kept_rows_then_nothing(rows, keep):
    mask = np.zeros(len(rows), bool)
    mask[np.random.default_rng(1).choice(len(rows), keep, replace=False)] = True
    xq = rows[:5] + 0.05
    sims, ids = blas_knn(xq, rows, 10, mask, block_rows=128)
    s = xq.astype(np.float64) @ rows.T.astype(np.float64)
    s[:, ~mask] = -np.inf
    got = min(keep, 10)
    np.testing.assert_array_equal(ids[:, :got], np.argsort(-s, axis=1, kind="stable")[:, :got])
    assert (ids[:, got:] == -1).all() and np.isneginf(sims[:, got:]).all()


def test_serving_knn_is_exact_on_both_sides_of_its_batch_threshold(rows):
    for m in (1, BLAS_MAX_QUERIES, BLAS_MAX_QUERIES + 1, 64):
        xq = rows[:m] + 0.05
        np.testing.assert_array_equal(serving_knn(xq, rows, 9)[1], exact_knn(xq, rows, 9)[1])
    np.testing.assert_array_equal(serving_knn(rows[:64], rows, 900)[1], exact_knn(rows[:64], rows, 500)[1])


def test_flat_rows_is_a_view_of_an_inner_product_flat_index_only(rows):
    index = faiss.IndexFlatIP(D)
    assert flat_rows(index) is None  # empty
    index.add(rows)
    view = flat_rows(index)
    assert view is not None and view.shape == rows.shape
    np.testing.assert_array_equal(view, rows)
    assert flat_rows(faiss.IndexFlatL2(D)) is None
    assert flat_rows(ivf(rows)) is None


def test_unaligned_rows_are_no_flat_view_and_still_searched_exactly(rows):
    """A memory-mapped .faiss file's codes start where its header ends: often not 4-aligned."""
    buf = np.zeros(rows.size * 4 + 1, np.uint8)
    unaligned = np.frombuffer(buf[1:].data, np.float32).reshape(rows.shape)
    unaligned[:] = rows
    assert not unaligned.flags.aligned
    index = faiss.IndexFlatIP(D)
    index.add(rows)
    assert flat_rows(index) is not None  # FAISS's own allocation is aligned
    mask = np.arange(len(rows)) % 3 == 0
    for m in (1, 40):
        xq = rows[:m] + 0.05
        np.testing.assert_array_equal(serving_knn(xq, unaligned, 9)[1], exact_knn(xq, rows, 9)[1])
        np.testing.assert_array_equal(serving_knn(xq, unaligned, 9, mask)[1], blas_knn(xq, rows, 9, mask)[1])
