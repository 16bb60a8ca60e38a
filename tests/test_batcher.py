"""Batched search returns exactly what each request would get alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from index_builder import artifact
from service.batcher import Batcher
from service.searcher import QueryError, Searcher


@pytest.fixture(scope="module")
def searcher(built_root):
    return Searcher(artifact.load(built_root))


def test_concurrent_requests_get_their_own_answers(searcher, small_gallery):
    x, _ = small_gallery
    batcher = Batcher(workers=2, max_rows=16)
    rng = np.random.default_rng(0)
    jobs = [(x[rng.integers(len(x), size=rng.integers(1, 4))] + 0.01, int(rng.integers(1, 12)),
             bool(rng.integers(2))) for _ in range(200)]
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda j: batcher.search(searcher, *j), jobs))
    finally:
        batcher.close()
    for (q, k, expand), hits in zip(jobs, got, strict=True):
        want = searcher.search(q, k, expand)
        for mine, theirs in zip(hits, want, strict=True):
            assert len(mine) == len(theirs) == k
            np.testing.assert_allclose([h.score for h in mine], [h.score for h in theirs],
                                       atol=1e-5)
            # the same rows, except inside a tie at the k-th score (exact duplicates: batch
            # and single searches may order a tie differently)
            cut = theirs[-1].score + 1e-5
            assert {h.row for h in mine if h.score > cut} == {h.row for h in theirs
                                                              if h.score > cut}
    assert batcher.rows >= 200 and batcher.batches <= len(jobs)


def test_versions_are_never_mixed_and_errors_reach_the_caller(built_root, searcher, small_gallery):
    x, _ = small_gallery
    other = Searcher(artifact.load(built_root))  # another loaded version object
    batcher = Batcher(workers=1)
    try:
        with ThreadPoolExecutor(8) as pool:
            pairs = list(pool.map(lambda i: (i % 2, batcher.search([searcher, other][i % 2],
                                                                   x[i : i + 1], 3)), range(40)))
        assert len(pairs) == 40
        with pytest.raises(QueryError, match="dimension"):
            batcher.search(searcher, np.ones((1, 5), np.float32), 3)
    finally:
        batcher.close()
