"""The searcher's own API: query checks at float32's edges, ids to rows, raw rows, min_score."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqe_retrieval import artifact, errors
from aqe_retrieval.errors import QueryError, UnknownIdError
from aqe_retrieval.searcher import Searcher
from index_builder.build import BuildConfig, build
from index_builder.expansion import AqeParams
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def searcher(built_root) -> Searcher:
    return Searcher(artifact.load(built_root))


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
