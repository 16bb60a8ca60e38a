"""``POST``/``DELETE /admin/items``: off by default, the core's exact add/delete when on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import serving

from aqe_retrieval import artifact
from aqe_retrieval.searcher import Searcher
from service.app import create_app
from service.settings import Settings
from tests.test_incremental import D, build, same_results

AUTH = {"Authorization": "Bearer secret"}


def _root(tmp_path: Path, n: int = 40) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((n, D)).astype(np.float32)
    build(tmp_path / "root", x, [f"r{i}" for i in range(n)])
    return tmp_path / "root", x


def _client(root: Path, **kw: object) -> TestClient:
    settings = Settings(index_root=root, reload_interval_s=0, admin_token="secret", **kw)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def test_writes_are_off_by_default_and_need_the_admin_token(tmp_path):
    root, _ = _root(tmp_path)
    body = {"embeddings": [[1.0] * D], "ids": ["n0"]}
    with _client(root) as client:  # AQE_ALLOW_WRITES unset: as absent as admin routes when off
        r = client.post("/admin/items", json=body, headers=AUTH)
        assert r.status_code == 404 and "AQE_ALLOW_WRITES" in r.json()["detail"]
        assert client.request("DELETE", "/admin/items", json={"ids": ["r1"]}, headers=AUTH).status_code == 404
    with TestClient(create_app(Settings(index_root=root, allow_writes=True))) as client:
        assert client.post("/admin/items", json=body).status_code == 404  # no token: admin is off
    with _client(root, allow_writes=True) as client:
        assert client.post("/admin/items", json=body).status_code == 401
        assert (
            client.post("/admin/items", json=body, headers={"Authorization": "Bearer no"}).status_code == 401
        )
    assert len(artifact.version_ids(root)) == 1


def test_add_and_delete_over_http_serve_what_a_full_build_serves(tmp_path):
    root, x = _root(tmp_path)
    rng = np.random.default_rng(2)
    new = rng.standard_normal((3, D)).astype(np.float32)
    first = artifact.current_version(root)
    with _client(root, allow_writes=True) as client:
        body = {"embeddings": new.tolist(), "ids": ["n0", "n1", "n2"]}
        r = client.post("/admin/items", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        added = r.json()
        assert added["applied"] and added["version"] != first and added["serving"] == added["version"]
        assert added["n"] == 43
        top = client.post("/search", json={"embedding": new[0].tolist(), "k": 1}).json()
        assert top["results"][0][0]["id"] == "n0" and top["index_version"] == added["version"]
        again = client.post("/admin/items", json=body, headers=AUTH).json()  # a retry: no-op
        assert not again["applied"] and again["version"] == added["version"]
        r = client.request("DELETE", "/admin/items", json={"ids": ["n1", "r5"]}, headers=AUTH)
        assert r.status_code == 200 and r.json()["n"] == 41
        # errors through the table: duplicate 400, unknown 404, dimension 400, busy 409
        dup = client.post("/admin/items", json={"embeddings": [[1.0] * D], "ids": ["r1"]}, headers=AUTH)
        assert dup.status_code == 400 and "already" in dup.json()["detail"]
        unknown = client.request("DELETE", "/admin/items", json={"ids": ["nope"]}, headers=AUTH)
        assert unknown.status_code == 404 and "unknown" in unknown.json()["detail"]
        dim = client.post("/admin/items", json={"embeddings": [[1.0] * (D + 1)], "ids": ["z"]}, headers=AUTH)
        assert dim.status_code == 400 and "dimension" in dim.json()["detail"]
        ragged = {"embeddings": [[1.0] * D, [1.0]], "ids": ["z", "y"]}
        assert client.post("/admin/items", json=ragged, headers=AUTH).status_code == 400
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with artifact.build_lock(root):
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        try:
            busy = client.post("/admin/items", json={"embeddings": [[1.0] * D], "ids": ["z"]}, headers=AUTH)
        finally:
            release.set()
            t.join()
        assert busy.status_code == 409
        assert client.post("/admin/items", content=b"{}", headers=AUTH).status_code == 415
    kept = {f"r{i}": x[i] for i in range(40) if i != 5} | {"n0": new[0], "n2": new[2]}
    build(tmp_path / "full", np.array(list(kept.values())), list(kept))
    queries = rng.standard_normal((10, D)).astype(np.float32)
    same_results(Searcher(artifact.load(root)), Searcher(artifact.load(tmp_path / "full")), queries)
    assert [r.kind for r in artifact.list_changes(root)] == ["add", "delete"]


def test_the_openapi_document_lists_the_item_routes(tmp_path):
    root, _ = _root(tmp_path)
    with _client(root) as client:
        paths = client.get("/openapi.json").json()["paths"]
    for method in ("post", "delete"):
        codes = set(paths["/admin/items"][method]["responses"])
        assert {"200", "400", "401", "404", "409", "415"} <= codes


@pytest.mark.parametrize("workers", [2])
def test_a_real_server_adds_and_every_worker_serves_it(tmp_path, workers):
    root, _ = _root(tmp_path)
    env = {
        "AQE_INDEX_ROOT": str(root),
        "AQE_RELOAD_INTERVAL_S": "0",  # no polling: the reload must reach every worker by itself
        "AQE_ADMIN_TOKEN": "secret",
        "AQE_ALLOW_WRITES": "true",
        "AQE_WORKERS": str(workers),
    }
    with serving(tmp_path / "server.log", env=env, workers=workers, timeout_s=60) as url:
        new = [[5.0] * D]
        r = httpx.post(
            f"{url}/admin/items", json={"embeddings": new, "ids": ["n0"]}, headers=AUTH, timeout=30
        )
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        deadline = time.monotonic() + 20
        seen: set[str] = set()
        while time.monotonic() < deadline:  # fresh connections land on either worker
            hit = httpx.post(f"{url}/search", json={"embedding": new[0], "k": 1}, timeout=5).json()
            seen.add(hit["index_version"])
            if hit["index_version"] == version:
                assert hit["results"][0][0]["id"] == "n0"
            ok = all(
                httpx.post(f"{url}/search", json={"embedding": new[0], "k": 1}, timeout=5).json()[
                    "index_version"
                ]
                == version
                for _ in range(8)
            )
            if ok:
                break
            time.sleep(0.1)
        else:
            log = (tmp_path / "server.log").read_text()
            pytest.fail(f"not every worker serves {version}: saw {seen}\n" + log)
        r = httpx.request("DELETE", f"{url}/admin/items", json={"ids": ["n0"]}, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["n"] == 40
