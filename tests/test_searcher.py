"""The searcher without HTTP: query checks (float32's edges too), top-k against brute force,
filters, ids to rows, raw rows, min_score, metadata."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqe_retrieval import artifact, errors
from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.errors import FilterError, QueryError, UnknownIdError
from aqe_retrieval.searcher import MAX_ABS_VALUE, Searcher
from index_builder.build import build
from index_builder.cli import main as builder
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams
from service.app import create_app
from service.settings import Settings


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


@pytest.fixture(scope="module")
def searcher_without_ids(tmp_path_factory, small_gallery) -> Searcher:
    _, paths = small_gallery
    root = tmp_path_factory.mktemp("no-ids")
    build(BuildConfig(gallery=paths["gallery"], root=root, params=AqeParams(qe_k=5), show_progress=False))
    return Searcher(artifact.load(root))


def ids_and_scores(hits):
    return [h.row for h in hits[0]], np.array([h.score for h in hits[0]])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exponent=st.floats(-330, 29), row=st.integers(0, 599))
def test_a_scaled_query_is_refused_or_answered_as_the_unscaled_one(searcher, small_gallery, exponent, row):
    x, _ = small_gallery
    q = x[row : row + 1].astype(np.float64) + 0.01
    base_ids, base_scores = ids_and_scores(searcher.search(q, 10, expand=False))
    scaled = q * 10.0**exponent
    try:
        checked = searcher.check_queries(scaled)
    except QueryError as exc:
        assert "[0]" in str(exc)  # names the row
        assert np.linalg.norm(scaled) < 1e-11 or np.abs(scaled).max() > 1e30
        return
    ids, scores = ids_and_scores(searcher.search_checked(checked, 10, expand=False))
    assert ids == base_ids
    np.testing.assert_allclose(scores, base_scores, atol=1e-5)
    # with expansion the query's raw scale matters, but scores are still cosines
    _, expanded = ids_and_scores(searcher.search_checked(checked, 10))
    assert expanded.max() <= 1 + 1e-5 and expanded.max() > 0.1


@pytest.mark.parametrize("scale", [1e-44, 1e-40, 1e-20, 1e-14])
def test_queries_float32_cannot_carry_are_refused_naming_the_rows(searcher, small_gallery, scale):
    x, _ = small_gallery
    batch = np.stack([x[0], x[1] * scale, x[2], x[3] * scale]).astype(np.float64)
    with pytest.raises(QueryError, match=r"embeddings \[1, 3\] are too small"):
        searcher.search(batch, 5)


def test_a_tiny_query_over_http_is_a_400_not_a_page_of_zero_scores(built_root, small_gallery):
    x, _ = small_gallery
    with TestClient(create_app(Settings(index_root=built_root, reload_interval_s=0))) as client:
        tiny = {"embedding": (x[5].astype(np.float64) * 1e-44).tolist(), "expand_query": False}
        r = client.post("/search", json=tiny)
        assert r.status_code == 400 and "too small" in r.json()["detail"], r.text
        small = client.post("/search", json={"embedding": (x[5] * 1e-6).tolist(), "expand_query": False})
        plain = client.post("/search", json={"embedding": x[5].tolist(), "expand_query": False})
        assert small.status_code == plain.status_code == 200
        assert [h["id"] for h in small.json()["results"][0]] == [h["id"] for h in plain.json()["results"][0]]
        r = client.post("/search", json={"embedding": x[5].tolist(), "filter": {"ts": 10**400}})
        assert r.status_code == 200 and r.json()["results"] == [[]]


def test_row_of_maps_every_external_id_back(searcher):
    for row in (0, 1, 299, 599):
        assert searcher.row_of(searcher.external_id(row)) == row
    for unknown in ("img-99999", "", "img-0000", "img-00001 ", "img-00001\0", "x" * 100_000):
        with pytest.raises(UnknownIdError, match="no gallery item"):
            searcher.row_of(unknown)


def test_row_of_without_ids_takes_canonical_row_numbers(searcher_without_ids):
    s = searcher_without_ids
    assert [s.row_of(str(r)) for r in (0, 7, 599)] == [0, 7, 599]
    for unknown in ("600", "-1", "07", "+7", "7.0", "٣", "9" * 5000):
        with pytest.raises(UnknownIdError):
            s.row_of(unknown)


def test_unknown_id_is_a_lookup_error_404_and_exit_2():
    exc = UnknownIdError("no gallery item 'x'")
    assert isinstance(exc, LookupError) and isinstance(exc, errors.AqeError)
    assert errors.http_status(exc) == 404
    assert errors.exit_code(exc) == errors.EXIT_BAD_INPUT


def test_raw_rows_are_the_gallery_items_own_vectors(searcher, small_gallery):
    x, _ = small_gallery
    rows = [3, 0, 599, 3]
    raw = searcher.raw_rows(rows)
    assert raw.dtype == np.float32 and raw.shape == (4, 32)
    np.testing.assert_allclose(raw, x[rows], rtol=1e-5, atol=1e-6)
    assert searcher.raw_rows([]).shape == (0, 32)
    with pytest.raises(UnknownIdError, match=r"\[600, -1\]"):
        searcher.raw_rows([1, 600, -1])
    with pytest.raises(QueryError):
        searcher.raw_rows([[1]])
    # "more like this item": the item itself comes back first when searched unexpanded
    hits = searcher.search(searcher.raw_rows([searcher.row_of("img-00042")]), 3, expand=False)
    assert 42 in [h.row for h in hits[0]]


def test_min_score_drops_the_hits_below_it(searcher, small_gallery):
    x, _ = small_gallery
    q = x[10:12] + 0.01
    full = searcher.search(q, 20)
    cut = float(np.median([h.score for h in full[0]]))
    kept = searcher.search(q, 20, min_score=cut)
    for f, k in zip(full, kept, strict=True):
        assert k == [h for h in f if h.score >= cut]
    assert searcher.search(q, 20, min_score=2.0) == [[], []]
    assert searcher.search(q, 20, min_score=-2.0) == full
    with pytest.raises(QueryError, match="min_score"):
        searcher.search(q, 5, min_score=float("nan"))


def level0_brute_force(searcher: Searcher, queries: np.ndarray) -> np.ndarray:
    """Cosines of the raw queries to every raw (level-0) gallery row."""
    rows = np.asarray(searcher.artifact.levels[0].rows, np.float64)
    return normalize_rows(queries)[0].astype(np.float64) @ rows.T


def assert_top(row: np.ndarray, got: list, k: int) -> None:
    """``got`` is a top-k of brute-force scores ``row``: the k best scores, each its row's own
    (the gallery has duplicates, so tied rows may come in either order)."""
    assert len(got) == k
    np.testing.assert_allclose([h.score for h in got], np.sort(row)[::-1][:k], atol=1e-5)
    np.testing.assert_allclose([row[h.row] for h in got], [h.score for h in got], atol=1e-5)


def test_raw_mode_is_plain_knn_over_the_unexpanded_gallery(searcher, small_gallery):
    x, _ = small_gallery
    queries = x[::75] + 0.01
    sims = level0_brute_force(searcher, queries)
    for expand in (True, False):  # raw never expands
        hits = searcher.search(queries, 8, expand, raw=True)
        for row, got in zip(sims, hits, strict=True):
            assert_top(row, got, 8)
    aqe_hits = searcher.search(queries, 8)
    assert [[h.score for h in r] for r in aqe_hits] != [[h.score for h in r] for r in hits]


def test_raw_mode_filters_and_min_score(searcher, small_gallery):
    x, _ = small_gallery
    q = x[7:9] + 0.01
    hits = searcher.search(q, 10, raw=True, filters={"camera": 2})
    cams = searcher.artifact.metadata["camera"]
    sims = level0_brute_force(searcher, q)
    sims[:, cams != 2] = -np.inf
    for row, got in zip(sims, hits, strict=True):
        assert_top(row, got, 10)
        assert all(cams[h.row] == 2 for h in got)
    cut = hits[0][4].score
    kept = searcher.search(q, 10, raw=True, filters={"camera": 2}, min_score=cut)
    assert [h.row for h in kept[0]] == [h.row for h in hits[0][:5]]


def test_raw_mode_through_an_approximate_level_index(tmp_path, small_gallery):
    """A level index (approximate graph) answers raw mode; every list probed it is exact."""
    x, paths = small_gallery
    root = tmp_path / "root"
    argv = ["build", "--gallery", str(paths["gallery"]), "--metadata", str(paths["metadata"])]
    argv += ["--root", str(root), "--qe-k", "5"]
    assert builder([*argv, "--knn", "IVF8,Flat", "--nprobe", "8", "--no-progress"]) == 0
    s = Searcher(artifact.load(root))
    assert s.artifact.levels[0].index is not None
    queries = x[::100] + 0.01
    sims = level0_brute_force(s, queries)
    for row, got in zip(sims, s.search(queries, 5, raw=True), strict=True):
        assert_top(row, got, 5)
    cams = s.artifact.metadata["camera"]
    sims[:, ~np.isin(cams, [1, 2])] = -np.inf  # through the level index's id selector
    filtered = s.search(queries, 5, raw=True, filters={"camera": {"in": [1, 2]}})
    for row, got in zip(sims, filtered, strict=True):
        assert_top(row, got, 5)


def _outcome(searcher, batch):
    try:
        return searcher.check_queries(batch)
    except QueryError as exc:
        return str(exc)


@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.floats(min_value=-1e-10, max_value=1e-10),
            st.sampled_from([0.0, MAX_ABS_VALUE, -MAX_ABS_VALUE, 1.5e30, -5e30, 1e29, 3e-39, 1e-45]),
        ),
        min_size=32,
        max_size=32,
    ),
    scale=st.sampled_from([1.0, 1e-13, 1e-30, 1e20, 1e30]),
    dtype=st.sampled_from([np.float64, np.float32, np.int64]),
)
@settings(max_examples=300, deadline=None)
def test_the_one_row_shortcut_decides_as_the_full_checks(searcher, values, scale, dtype):
    """A single query takes a shortcut (two dot products); two copies of it take the full checks."""
    with np.errstate(all="ignore"):
        row = (np.asarray(values) * scale).astype(dtype)
    one = _outcome(searcher, row[None])
    two = _outcome(searcher, np.stack([row, row]))
    if isinstance(two, str):
        assert isinstance(one, str) and one == two.replace("[0, 1]", "[0]"), (one, two)
    else:
        assert not isinstance(one, str), one
        np.testing.assert_array_equal(one[0], two[0])
        assert one.dtype == np.float32
