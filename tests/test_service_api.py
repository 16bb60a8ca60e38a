"""The HTTP contract with TestClient (lifespan runs) on a real artifact built by the builder."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from aqe_retrieval import artifact
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(built_root):
    settings = Settings(
        index_root=built_root,
        reload_interval_s=0,
        max_k=50,
        max_batch=8,
        max_body_bytes=64 * 1024,
        admin_token="t0ken",
    )
    with TestClient(create_app(settings)) as c:
        yield c


def q(x, i):
    return (x[i] + 0.01).tolist()


def test_single_and_batch(client, small_gallery):
    x, _ = small_gallery
    r = client.post("/search", json={"embedding": q(x, 10), "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index_version"] == artifact.current_version(client.app.state.settings.index_root)
    [hits] = body["results"]
    assert len(hits) == 5 and hits[0]["id"] == "img-00010"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "metadata" not in hits[0]
    r = client.post(
        "/search", json={"embeddings": [q(x, 1), q(x, 2), q(x, 3)], "k": 3, "with_metadata": True}
    )
    results = r.json()["results"]
    assert [len(h) for h in results] == [3, 3, 3]
    assert results[2][0]["metadata"] == {"camera": 3, "ts": 3, "label": "p0"}


def test_k_larger_than_gallery_never_pads(client, small_gallery):
    x, _ = small_gallery
    settings = client.app.state.settings
    r = client.post("/search", json={"embedding": q(x, 0), "k": settings.max_k, "filter": {"ts": {"lt": 7}}})
    hits = r.json()["results"][0]
    assert len(hits) == 7 and len({h["id"] for h in hits}) == 7


@pytest.mark.parametrize(
    ("flt", "ok"),
    [
        ({"camera": {"not_in": [3]}}, lambda m: m["camera"] != 3),
        ({"camera": {"in": [1, 2]}}, lambda m: m["camera"] in (1, 2)),
        ({"camera": 4}, lambda m: m["camera"] == 4),
        ({"label": {"in": ["p7", "p9"]}}, lambda m: m["label"] in ("p7", "p9")),
        ({"camera": 4, "ts": {"gte": 300}}, lambda m: m["camera"] == 4 and m["ts"] >= 300),
    ],
)
def test_filters_hold_for_every_hit_and_k_hits_come_back(client, small_gallery, flt, ok):
    x, _ = small_gallery
    r = client.post("/search", json={"embedding": q(x, 42), "k": 10, "filter": flt, "with_metadata": True})
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]
    assert len(hits) == 10
    assert all(ok(h["metadata"]) for h in hits)


def test_expand_query_false_searches_the_raw_query(client, small_gallery):
    x, _ = small_gallery
    a = client.post("/search", json={"embedding": q(x, 5), "k": 10}).json()["results"][0]
    b = client.post("/search", json={"embedding": q(x, 5), "k": 10, "expand_query": False}).json()["results"][
        0
    ]
    assert a[0]["id"] == b[0]["id"] == "img-00005"
    assert [h["score"] for h in a] != [h["score"] for h in b]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"embedding": [1.0, 2.0]}, 400, "dimension 2 does not match"),
        ({"embedding": []}, 400, "empty embedding"),
        ({"embeddings": []}, 400, "is empty"),
        ({"embeddings": [[1.0] * 32] * 9}, 400, "over the limit of 8"),
        ({"embeddings": [[1.0] * 32, [1.0] * 31]}, 400, "different lengths"),
        ({"embedding": [0.0] * 32}, 400, "all zeros"),
        ({"embedding": [1.0] * 32, "k": 0}, 400, "k must be between 1 and 50"),
        ({"embedding": [1.0] * 32, "k": 51}, 400, "k must be between 1 and 50"),
        ({"embedding": [1.0] * 32, "embeddings": [[1.0] * 32]}, 400, "exactly one"),
        ({}, 400, "exactly one"),
        ({"embedding": [1.0] * 32, "filter": {"colour": 1}}, 400, "unknown filter column"),
        ({"embedding": [1.0] * 32, "filter": {"camera": "x"}}, 400, "is not an integer"),
        ({"embedding": [1.0] * 32, "filter": {"camera": {"like": 1}}}, 400, "unknown operator"),
        ({"embedding": [1.0] * 32, "filter": {"label": {"gt": "a"}}}, 400, "numeric column"),
        ({"embedding": ["a"] * 32}, 422, "valid number"),
        ({"embedding": [1.0] * 32, "bogus": 1}, 422, "Extra inputs"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(client, body, status, message):
    r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert message in r.text


def test_non_finite_values_and_non_json(client):
    body = '{"embedding": [NaN' + ", 1.0" * 31 + "]}"
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "NaN or Inf" in r.text
    r = client.post("/search", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text


def test_body_size_limit(client):
    r = client.post(
        "/search", content=b"[" + b"1.0," * 40_000 + b"1.0]", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "limit" in r.text

    def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_operations_routes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/info").json()
    assert info["n"] == 600 and info["d"] == 32 and info["effective_qe_k"] == 5
    assert info["metadata_columns"] == ["camera", "ts", "label"] and info["built_at"]
    client.post("/search", json={"embedding": [1.0] * 32, "k": 1})
    text = client.get("/metrics").text
    assert 'aqe_requests_total{route="/search",status="200"}' in text
    assert "aqe_request_seconds_bucket" in text and "aqe_queries_per_request" in text
    assert "aqe_index_info{version=" in text and "aqe_index_age_seconds" in text
    assert "aqe_reloads_total 1.0" in text
    assert client.get("/openapi.json").json()["paths"]["/search"]["post"]
    assert client.get("/docs").status_code == 200


def test_admin_reload_needs_the_token(client):
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 200 and r.json()["status"] == "loaded"


def test_admin_routes_are_off_without_a_token(built_root):
    with TestClient(create_app(Settings(index_root=built_root, reload_interval_s=0))) as c:
        assert c.post("/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 404


def test_alive_but_not_ready_until_a_version_appears(tmp_path, small_gallery):
    from index_builder.build import build
    from index_builder.config import BuildConfig

    with TestClient(create_app(Settings(index_root=tmp_path, reload_interval_s=0.05))) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/search", json={"embedding": [1.0] * 32})
        assert r.status_code == 503 and "no index version" in r.text
        _, paths = small_gallery
        build(BuildConfig(gallery=paths["gallery"], root=tmp_path, show_progress=False))
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            import time

            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200
        assert c.post("/search", json={"embedding": np.ones(32).tolist()}).status_code == 200


def test_empty_admin_token_keeps_admin_routes_off(built_root, monkeypatch):
    monkeypatch.setenv("AQE_ADMIN_TOKEN", "  ")
    monkeypatch.setenv("AQE_INDEX_ROOT", str(built_root))
    settings = Settings()  # type: ignore[call-arg]
    assert settings.admin_token is None
    with TestClient(create_app(settings)) as c:
        assert c.post("/admin/reload", headers={"Authorization": "Bearer "}).status_code == 404


def test_nightly_status_shows_in_info_and_metrics(tmp_path, small_gallery):
    from index_builder.cli import main

    _, paths = small_gallery
    root = tmp_path / "root"
    assert main(["nightly", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"]) == 0
    with TestClient(create_app(Settings(index_root=root, reload_interval_s=0, stale_after_s=3600))) as c:
        info = c.get("/info").json()
        assert info["nightly"]["last_success"]["version"] == info["index_version"]
        assert info["nightly"]["stale"] is False and info["nightly"]["staleness_s"] < 600
        text = c.get("/metrics").text
        assert "aqe_nightly_staleness_seconds" in text
        assert "aqe_nightly_consecutive_failures 0.0" in text
