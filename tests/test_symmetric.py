"""The symmetric exact kNN kernel against brute force, on one worker and on two."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, random_data
from knn_oracle import assert_exact_topk
from parity import assert_parity
from reference import reference_aqe

from aqe_retrieval.aqe import normalize_rows
from index_builder.expansion import AqeParams, Expansion
from index_builder.inputs import as_source
from index_builder.knn import KnnSpec, self_knn
from index_builder.symmetric import symmetric_self_knn

WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])


@WORKERS
@pytest.mark.parametrize(
    ("n", "d", "k", "tile"),
    [
        (1, 4, 1, 1),  # a single row
        (40, 4, 3, 1),  # tiles of one row
        (37, 8, 37, 5),  # k = n, n not divisible by the tile
        (101, 16, 1, 7),  # k = 1: each row's own
        (257, 24, 10, 64),  # odd n, last tile of one row
        (500, 24, 7, 33),
        (300, 12, 10, 1000),  # one tile holds everything
        (64, 8, 20, 4),  # k larger than the tile
    ],
)
def test_symmetric_kernel_equals_brute_force(n, d, k, tile, workers):
    u, _ = normalize_rows(random_data(n, d, seed=n + d))
    sims, ids = symmetric_self_knn(u, k, tile, workers=workers)
    assert_exact_topk(u, ids, sims, k)
    if k == 1:
        np.testing.assert_array_equal(ids[:, 0], np.arange(n))  # no ties in random data
    if k == n:
        assert all(set(row) == set(range(n)) for row in ids.tolist())


@WORKERS
@pytest.mark.parametrize("tile", [5, 9, 128])
def test_symmetric_kernel_with_duplicates_differs_only_inside_ties(tile, workers):
    x = clustered_data(400, 16, seed=4)  # exact duplicate rows: ties at the k-th place
    x[100:120] = x[99]  # and a block of 21 identical rows (k = 10 inside it)
    u, _ = normalize_rows(x)
    sims, ids = symmetric_self_knn(u, 10, tile, workers=workers)
    assert_exact_topk(u, ids, sims, 10)
    assert set(ids[105].tolist()) <= set(range(99, 120))


def test_symmetric_kernel_reports_progress_of_every_row():
    u, _ = normalize_rows(random_data(333, 8, seed=6))
    seen = []
    self_knn(u, 4, KnnSpec(exact_kernel="symmetric"), 50, seen.append)
    assert sum(seen) == 333 and all(s > 0 for s in seen)


@pytest.mark.parametrize(
    ("kind", "n", "d", "qe_k", "alpha", "qe_times"),
    [
        ("random", 400, 512, 10, 3.0, 2),
        ("clustered", 1000, 64, 10, 3.0, 2),
        ("clustered", 300, 64, 10, 0.5, 2),
    ],
)
def test_aqe_parity_through_the_symmetric_kernel(kind, n, d, qe_k, alpha, qe_times):
    make = clustered_data if kind == "clustered" else random_data
    x = make(n, d, seed=n + d)
    nq = n // 10
    ref_q, ref_g, rounds = reference_aqe(x[:nq], x[nq:], qe_times, qe_k, alpha)
    expansion = Expansion(
        as_source(x),
        AqeParams(qe_k=qe_k, alpha=alpha, qe_times=qe_times),
        KnnSpec(exact_kernel="symmetric"),
        block_size=97,
        show_progress=False,
    )
    sets = [level.knn.ids.copy() for level in expansion]
    assert_parity(expansion.expanded, sets, np.concatenate([ref_q, ref_g]), rounds)
