"""Property-based fuzzing of ``POST /search``: whatever arrives, the answer is never a 5xx.

1,020 generated requests (the tests count them): arbitrary JSON values, search-shaped
bodies with wrong types, huge and tiny numbers, NaN/Infinity literals, nested junk, wrong
dimensions, huge k, bad filters, and raw bytes under assorted content types. Every rejection is
a 4xx whose JSON ``detail`` says something; every 200 is a well-formed answer. The app runs with
``raise_server_exceptions=False`` so a crash shows as the 500 a client would see, and pytest's
``filterwarnings = error`` turns numpy overflow warnings on the request path into such crashes.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import Settings

D, MAX_K, MAX_BATCH = 32, 50, 8
INT64 = 2**63 - 1
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def client(built_root):
    s = Settings(
        index_root=built_root,
        reload_interval_s=0,
        max_k=MAX_K,
        max_batch=MAX_BATCH,
        max_body_bytes=256 * 1024,
    )
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c


def check(r, queries: int | None = None, k: object = None) -> None:
    """The contract: never 5xx; a 4xx has a JSON ``detail``; a 200 is a well-formed answer."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    if r.status_code >= 400:
        detail = body["detail"]
        assert detail, body
        if isinstance(detail, list):
            assert all(isinstance(e["msg"], str) and e["msg"] for e in detail), detail
            assert all("input" not in e for e in detail), "validation errors echo the input"
        else:
            assert isinstance(detail, str)
        return
    assert r.status_code == 200, r.text
    assert isinstance(body["index_version"], str)
    if queries is not None:
        assert len(body["results"]) == queries
    for hits in body["results"]:
        if isinstance(k, int):
            assert len(hits) <= k
        scores = [h["score"] for h in hits]
        assert all(math.isfinite(s) for s in scores)
        assert scores == sorted(scores, reverse=True)


def post(client: TestClient, body: object):
    # json.dumps writes NaN / Infinity / -Infinity literals, as a sloppy client would
    return client.post(
        "/search", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )


def counted(test: Callable[[], None], sent: list[int], at_least: int) -> None:
    test()
    assert len(sent) >= at_least, f"only {len(sent)} requests generated"


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-10, max_value=10),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from(
        [0.0, -0.0, 1e-320, 5e-324, 1e-46, 3.4e38, 3.5e38, 1e39, 1e300, 1.7e308, 2**64, -(2**63) - 1]
    ),
)


def nested(leaf_numbers: st.SearchStrategy) -> st.SearchStrategy:
    """Any JSON value: scalars, lists and objects nested a few levels deep."""
    return st.recursive(
        st.none() | st.booleans() | leaf_numbers | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=8,
    )


junk = nested(numbers)
junk64 = nested(st.floats() | st.integers(-(INT64**2), INT64**2))


def _vector(dim: int, seed: int, specials: list[tuple[int, object]]) -> list:
    # Values from a seeded generator, then a few drawn specials at drawn positions: much cheaper
    # to generate than ``dim`` separate Hypothesis draws, and the specials still shrink.
    rng = random.Random(seed)
    row: list = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    for pos, value in specials:
        if dim:
            row[pos % dim] = value
    return row


def vector(dim: st.SearchStrategy[int], wild: bool = True) -> st.SearchStrategy[list]:
    """A would-be embedding of ``dim`` values, with wrong-typed or extreme values when ``wild``."""
    special = (numbers | junk) if wild else numbers
    return st.builds(
        _vector, dim, st.integers(0, 2**32), st.lists(st.tuples(st.integers(0, 10**6), special), max_size=3)
    )


dims = st.sampled_from([D, D, D, D, 0, 1, D - 1, D + 1, 3 * D])
filter_value = st.one_of(
    st.integers(-INT64 - 1, INT64),
    st.floats(),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-INT64 - 1, INT64) | st.text(max_size=4) | st.floats(), max_size=5),
    junk64,
)
filters = st.dictionaries(
    st.sampled_from(["camera", "ts", "label", "nope", ""]),
    filter_value
    | st.dictionaries(
        st.sampled_from(["in", "not_in", "gt", "gte", "lt", "lte", "eq", "like", ""]),
        filter_value,
        max_size=3,
    ),
    max_size=3,
)
search_bodies = st.fixed_dictionaries(
    {},
    optional={
        "embedding": vector(dims) | junk,
        "embeddings": st.lists(vector(dims), max_size=MAX_BATCH + 2) | junk,
        "k": st.integers(-5, MAX_K + 5) | st.integers() | numbers | junk,
        "expand_query": st.booleans() | junk,
        "filter": filters | junk64,
        "with_metadata": st.booleans() | junk,
        "extra": junk,
    },
)


@pytest.mark.slow
def test_search_shaped_bodies_never_5xx(client):
    sent: list[int] = []

    @settings(FUZZ, max_examples=360)
    @given(search_bodies)
    def run(body):
        sent.append(1)
        r = post(client, body)
        queries = None
        if r.status_code == 200:
            queries = 1 if "embedding" in body else len(body["embeddings"])
        check(r, queries, body.get("k", 10))

    counted(run, sent, 360)


@pytest.mark.slow
def test_well_formed_queries_with_random_values_and_filters(client):
    sent: list[int] = []

    @settings(FUZZ, max_examples=300)
    @given(
        st.lists(vector(st.just(D), wild=False), min_size=1, max_size=MAX_BATCH),
        st.integers(1, MAX_K),
        filters,
        st.booleans(),
        st.booleans(),
    )
    def run(rows, k, flt, expand, meta):
        sent.append(1)
        r = post(
            client, {"embeddings": rows, "k": k, "filter": flt, "expand_query": expand, "with_metadata": meta}
        )
        check(r, len(rows), k)

    counted(run, sent, 300)


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/json-patch+json",
    "",
    "*/*",
]


@pytest.mark.slow
def test_arbitrary_bytes_and_json_values_under_any_content_type(client):
    sent: list[int] = []
    payloads = st.one_of(
        st.binary(max_size=300),
        junk.map(lambda v: json.dumps(v).encode()),
        st.text(max_size=200).map(str.encode),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
        st.integers(1, 5000).map(lambda n: b'{"embedding": ' + b"[" * n),  # cut short
        junk.map(lambda v: json.dumps({"embedding": v}).encode()).map(lambda b: b[: len(b) // 2]),
    )

    @settings(FUZZ, max_examples=360)
    @given(payloads, st.sampled_from(CONTENT_TYPES))
    def run(payload, content_type):
        sent.append(1)
        headers = {"content-type": content_type} if content_type else {}
        check(client.post("/search", content=payload, headers=headers))

    counted(run, sent, 360)


def test_other_methods_and_paths_answer_4xx_with_detail(client):
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = client.request(method, "/search", json={"embedding": [1.0] * D})
        assert r.status_code == 405 and r.json()["detail"]
    r = client.post("/search/../admin/reload")
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["detail"]


def test_validation_errors_are_bounded_and_do_not_echo_the_body(client):
    r = post(client, {"embeddings": [["x"] * D] * MAX_BATCH})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(detail) == 21 and detail[-1]["type"] == "too_many_errors"
    assert "more errors" in detail[-1]["msg"] and len(r.content) < 4096


@pytest.mark.parametrize("value", [3.5e38, 1e39, 1e300, -1.7e308, 10**40])
def test_values_that_overflow_float32_are_refused_with_a_reason(client, value):
    r = post(client, {"embedding": [1.0] * (D - 1) + [value]})
    assert r.status_code == 400 and "beyond +-1e+30" in r.json()["detail"], r.text


@pytest.mark.parametrize("op", ["in", "not_in"])
def test_filter_list_with_an_integer_beyond_int64_is_not_a_500(client, op):
    r = post(client, {"embedding": [1.0] * D, "filter": {"camera": {op: [2**63]}}})
    check(r)


def test_filter_in_does_not_match_a_truncated_string(client):
    # labels are p0 .. p99 ('<U3'): "p10-and-more" must not match "p10"
    r = post(
        client,
        {
            "embedding": [1.0] * D,
            "k": 10,
            "with_metadata": True,
            "filter": {"label": {"in": ["p10-and-more"]}},
        },
    )
    assert r.status_code == 200 and r.json()["results"] == [[]], r.text
