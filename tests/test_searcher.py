"""The searcher without HTTP: query checks, top-k against brute force, filters, ids, metadata."""

from __future__ import annotations

import numpy as np
import pytest

from aqe_retrieval import artifact
from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.errors import FilterError, QueryError
from aqe_retrieval.searcher import MAX_ABS_VALUE, Searcher


@pytest.fixture(scope="module")
def searcher(built_root) -> Searcher:
    return Searcher(artifact.load(built_root))


def brute_force(searcher: Searcher, queries: np.ndarray, expand: bool) -> np.ndarray:
    """Cosines of the (expanded) queries to every row of the served, expanded gallery."""
    served = searcher.artifact.serving_index.reconstruct_n(0, searcher.n)
    xq = searcher.expand(queries) if expand else queries
    return normalize_rows(xq)[0].astype(np.float64) @ served.T.astype(np.float64)


@pytest.mark.parametrize("expand", [True, False])
def test_search_equals_brute_force_over_the_served_gallery(searcher, small_gallery, expand):
    x, _ = small_gallery
    queries = x[::60] + 0.01
    hits = searcher.search(queries, 8, expand)
    sims = brute_force(searcher, queries, expand)
    for row, s in zip(hits, sims, strict=True):
        assert len(row) == 8
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, -np.sort(-s)[:8], atol=1e-5)
        np.testing.assert_allclose(scores, s[[h.row for h in row]], atol=1e-5)


def test_k_above_n_returns_every_row_once(searcher, small_gallery):
    x, _ = small_gallery
    [row] = searcher.search(x[:1], searcher.n + 100)
    assert sorted(h.row for h in row) == list(range(searcher.n))


def test_filters_hold_and_match_brute_force_over_the_allowed_rows(searcher, small_gallery):
    x, _ = small_gallery
    camera = searcher.artifact.metadata["camera"]
    queries = x[[1, 100]] + 0.01
    hits = searcher.search(queries, 5, filters={"camera": {"in": [2]}, "ts": {"lt": 300}})
    allowed = np.flatnonzero((camera == 2) & (searcher.artifact.metadata["ts"] < 300))
    sims = brute_force(searcher, queries, True)
    for row, s in zip(hits, sims, strict=True):
        assert {h.row for h in row} <= set(allowed.tolist()) and len(row) == 5
        np.testing.assert_allclose([h.score for h in row], -np.sort(-s[allowed])[:5], atol=1e-5)


def test_a_filter_nothing_passes_gives_no_hits_and_a_few_give_only_those(searcher, small_gallery):
    x, _ = small_gallery
    assert searcher.search(x[:2], 5, filters={"camera": 99}) == [[], []]
    [row] = searcher.search(x[:1], 10, filters={"ts": {"lt": 3}})
    assert sorted(h.row for h in row) == [0, 1, 2]  # fewer than k: never padded


def test_bad_filters_are_filter_errors(searcher, small_gallery):
    x, _ = small_gallery
    with pytest.raises(FilterError, match="unknown filter column"):
        searcher.search(x[:1], 3, filters={"colour": 1})


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (np.ones((0, 32)), "send at least one query embedding"),
        (np.ones(32), "send at least one query embedding"),
        (np.ones((2, 31)), "embedding dimension 31 does not match the index's 32"),
        (np.array([["a"] * 32]), "must be real numbers"),
        (np.ones((1, 32)) * 1j, "must be real numbers"),
        (np.vstack([np.ones(32), np.full(32, np.nan)]), r"embeddings \[1\] contain NaN or Inf"),
        (np.vstack([np.full(32, -np.inf), np.ones(32)]), r"embeddings \[0\] contain NaN or Inf"),
        (
            np.vstack([np.ones(32), np.ones(32), np.full(32, 2 * MAX_ABS_VALUE)]),
            r"embeddings \[2\] have values beyond",
        ),
        (np.vstack([np.ones(32), np.zeros(32)]), r"embeddings \[1\] are all zeros"),
    ],
)
def test_check_queries_refuses_with_the_reason(searcher, queries, message):
    with pytest.raises(QueryError, match=message):
        searcher.check_queries(queries)


def test_check_queries_passes_good_rows_as_float32(searcher):
    q = np.ones((3, 32), dtype=np.float64) * MAX_ABS_VALUE
    out = searcher.check_queries(q)
    assert out.dtype == np.float32 and out.shape == (3, 32)


def test_k_below_one_is_refused(searcher, small_gallery):
    x, _ = small_gallery
    with pytest.raises(QueryError, match="k must be >= 1, got 0"):
        searcher.search(x[:1], 0)


def test_ids_metadata_and_the_loaded_version(searcher, built_root):
    assert searcher.version == artifact.current_version(built_root)
    assert (searcher.n, searcher.d, searcher.qe_k) == (600, 32, 5)
    assert searcher.external_id(7) == "img-00007"
    assert searcher.metadata(7) == {"camera": 1, "ts": 7, "label": "p1"}
    assert all(type(v) in (int, str) for v in searcher.metadata(0).values())  # JSON-ready


def test_without_ids_the_row_number_is_the_id(tmp_path, small_gallery):
    from index_builder.build import build
    from index_builder.config import BuildConfig

    _, paths = small_gallery
    build(BuildConfig(gallery=paths["gallery"], root=tmp_path, show_progress=False))
    plain = Searcher(artifact.load(tmp_path))
    assert plain.external_id(12) == "12" and plain.metadata(12) == {}
    plain.warm_up()
