"""Resource limits: k, batch and body size at their edges, and the index memory budget.

Oversized bodies are refused by the body-limit middleware before any route runs, so before any
JSON is parsed: the 413s below are counted under the route label ``unmatched``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from aqe_retrieval import artifact
from aqe_retrieval.filters import DEFAULT_MAX_VALUES
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams
from service.app import create_app
from service.middleware import BODY_ALLOWANCE, BYTES_PER_VALUE
from service.settings import Settings

D, MAX_K, MAX_BATCH = 32, 20, 8


@pytest.fixture(scope="module")
def client(built_root):
    s = Settings(index_root=built_root, reload_interval_s=0, max_k=MAX_K, max_batch=MAX_BATCH)
    with TestClient(create_app(s)) as c:
        yield c


def rows(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, D)).tolist()


def refused_unparsed(client: TestClient) -> float:
    m = re.search(
        r'^aqe_requests_total\{route="unmatched",status="413"\} (\S+)$', client.get("/metrics").text, re.M
    )
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(
    ("k", "status"), [(1, 200), (MAX_K, 200), (MAX_K + 1, 400), (0, 400), (-1, 400), (10**12, 400)]
)
def test_k_at_the_limit(client, k, status):
    r = client.post("/search", json={"embedding": rows(1)[0], "k": k})
    assert r.status_code == status, r.text
    if status == 200:
        assert len(r.json()["results"][0]) == k
    else:
        assert r.json()["detail"] == f"k must be between 1 and {MAX_K}, got {k}"


@pytest.mark.parametrize(("n", "status"), [(1, 200), (MAX_BATCH, 200), (MAX_BATCH + 1, 400)])
def test_batch_at_the_limit(client, n, status):
    r = client.post("/search", json={"embeddings": rows(n), "k": 3})
    assert r.status_code == status, r.text
    if status == 200:
        assert len(r.json()["results"]) == n
    else:
        assert r.json()["detail"] == f"batch of {n} is over the limit of {MAX_BATCH}"


def test_an_oversized_batch_is_refused_before_it_is_parsed(client):
    limit = MAX_BATCH * D * BYTES_PER_VALUE + BODY_ALLOWANCE
    body = json.dumps({"embeddings": rows(limit // (D * 20) + 1)}).encode()
    assert len(body) > limit
    before = refused_unparsed(client)
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == (
        f"request body over the {limit}-byte limit (AQE_MAX_BATCH={MAX_BATCH} queries of d={D})"
    )
    assert refused_unparsed(client) == before + 1

    def chunked():  # no content-length: cut off once the limit is passed
        for lo in range(0, len(body), 65536):
            yield body[lo : lo + 65536]

    r = client.post("/search", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and refused_unparsed(client) == before + 2


def test_the_largest_legal_batch_fits_even_pretty_printed(client):
    """The derived limit leaves room for the verbose JSON a client may send (float64 reprs)."""
    body = json.dumps(
        {
            "embeddings": rows(MAX_BATCH),
            "k": MAX_K,
            "filter": {"camera": {"not_in": list(range(DEFAULT_MAX_VALUES))}},
        },
        indent=8,
    ).encode()
    assert len(body) > MAX_BATCH * D * 30
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]


def test_body_limit_is_the_configured_one_until_a_version_is_loaded(tmp_path):
    s = Settings(index_root=tmp_path, reload_interval_s=0, max_body_bytes=4096)
    with TestClient(create_app(s)) as c:
        r = c.post("/search", content=b" " * 5000, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["detail"] == "request body over the 4096-byte limit (AQE_MAX_BODY_BYTES)"
        r = c.post("/search", json={"embedding": [1.0] * D})
        assert r.status_code == 503


def test_a_smaller_configured_body_limit_wins(built_root):
    s = Settings(index_root=built_root, reload_interval_s=0, max_body_bytes=2048)
    with TestClient(create_app(s)) as c:
        r = c.post("/search", content=b" " * 3000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "(AQE_MAX_BODY_BYTES)" in r.json()["detail"]


# ------------------------------------------------------------------- memory budget


def test_memory_budget_setting(tmp_path, monkeypatch):
    assert Settings(index_root=tmp_path).max_index_bytes is None
    monkeypatch.setenv("AQE_INDEX_ROOT", str(tmp_path))
    monkeypatch.setenv("AQE_MAX_INDEX_BYTES", "")
    assert Settings().max_index_bytes is None  # type: ignore[call-arg]
    monkeypatch.setenv("AQE_MAX_INDEX_BYTES", "1000000")
    assert Settings().max_index_bytes == 1_000_000  # type: ignore[call-arg]
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv("AQE_MAX_INDEX_BYTES", bad)
        with pytest.raises(ValidationError, match="max_index_bytes"):
            Settings()  # type: ignore[call-arg]


def version_bytes(root, version: str | None) -> int:
    assert version is not None
    return sum(f.bytes for f in artifact.read_manifest(root, version).files.values())


def test_a_version_over_the_memory_budget_is_refused_at_start_up(built_root):
    version = artifact.current_version(built_root)
    size = version_bytes(built_root, version)
    s = Settings(index_root=built_root, reload_interval_s=0, max_index_bytes=size - 1, admin_token="t")
    with TestClient(create_app(s)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        # the error text is for admins only
        failure = c.get("/info", headers={"Authorization": "Bearer t"}).json()["last_reload_failure"]
        assert failure["version"] == version
        assert "AQE_MAX_INDEX_BYTES" in failure["error"] and str(size) in failure["error"]
    s = Settings(index_root=built_root, reload_interval_s=0, max_index_bytes=size)
    with TestClient(create_app(s)) as c:
        assert c.get("/readyz").status_code == 200


def test_a_bigger_version_over_the_budget_is_refused_and_the_old_one_serves(tmp_path, small_gallery):
    x, _ = small_gallery
    root = tmp_path / "root"
    np.save(tmp_path / "small.npy", x[:300])
    np.save(tmp_path / "large.npy", x)
    v1 = build(
        BuildConfig(gallery=tmp_path / "small.npy", root=root, params=AqeParams(qe_k=5), show_progress=False)
    ).version
    budget = version_bytes(root, v1) + 1000
    s = Settings(index_root=root, reload_interval_s=0, admin_token="t", max_index_bytes=budget)
    with TestClient(create_app(s)) as c:
        assert c.get("/readyz").json()["index_version"] == v1
        v2 = build(
            BuildConfig(
                gallery=tmp_path / "large.npy", root=root, params=AqeParams(qe_k=5), show_progress=False
            )
        ).version
        r = c.post("/admin/reload", headers={"Authorization": "Bearer t"})
        assert r.status_code == 409 and "AQE_MAX_INDEX_BYTES" in r.json()["error"], r.text
        assert str(version_bytes(root, v2)) in r.json()["error"]
        r = c.post("/search", json={"embedding": x[0].tolist(), "k": 2})
        assert r.status_code == 200 and r.json()["index_version"] == v1
