"""POST /search ahead of FastAPI's layers answers exactly as the documented FastAPI route does."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import serving

from service.app import create_app
from service.protocol import CONTINUE, HeadWithBody
from service.settings import Settings


@pytest.fixture(scope="module")
def clients(built_root):
    """The app as served, and the same app with every request through FastAPI's own stack."""
    settings = Settings(
        index_root=built_root, reload_interval_s=0, max_k=50, max_batch=8, max_body_bytes=64 * 1024
    )
    app = create_app(settings)

    async def through_fastapi(scope, receive, send):
        await FastAPI.__call__(app, scope, receive, send)

    with TestClient(app) as served:  # the lifespan (index, batcher) runs once, for both
        yield served, TestClient(through_fastapi)


def requests(x: np.ndarray) -> list[dict]:
    """One request of each kind the contract names, answered or refused."""
    q = (x[3] + 0.01).tolist()
    js = {"content-type": "application/json"}
    f32 = {"content-type": "application/octet-stream"}
    return [
        {"json": {"embedding": q, "k": 4}},
        {"json": {"embeddings": [q, q], "k": 3, "with_metadata": True, "min_score": 0.5}},
        {"json": {"id": "img-00007", "k": 3, "mode": "raw"}},
        {"json": {"ids": ["img-00001", "img-00002"], "k": 2, "expand_query": False}},
        {"json": {"embedding": q, "k": 5, "filter": {"camera": {"in": [1, 2]}}}},
        {"content": np.asarray([q], "<f4").tobytes(), "headers": f32, "params": {"k": "2"}},
        {"json": {"embedding": q, "k": 0}},  # 400
        {"json": {"embedding": q[:5]}},  # 400: dimension
        {"json": {"id": "no-such-item"}},  # 404
        {"content": b"x" * (65 * 1024), "headers": js},  # 413
        {"content": b"{}", "headers": {"content-type": "text/plain"}},  # 415
        {"content": b"{not json", "headers": js},  # 422
        {"json": {"embedding": q, "unknown": 1}},  # 422
        {"json": {"embedding": q, "mode": "raw", "expand_query": True}},  # 400
        {"content": b"\x00" * 7, "headers": f32},  # 400: not whole rows
    ]


def test_every_answer_and_refusal_is_the_documented_routes(clients, small_gallery):
    served, reference = clients
    x, _ = small_gallery
    statuses = []
    for request in requests(x):
        got = served.post("/search", **request)
        want = reference.post("/search", **request)
        assert (got.status_code, got.headers.get("content-type")) == (
            want.status_code,
            want.headers.get("content-type"),
        ), request
        assert got.content == want.content, request
        statuses.append(got.status_code)
    assert sorted(set(statuses)) == [200, 400, 404, 413, 415, 422]


def test_search_requests_are_counted_under_their_route(clients, small_gallery):
    served, _ = clients
    x, _ = small_gallery
    served.post("/search", json={"embedding": x[0].tolist(), "k": 2})
    served.post("/search", content=b"{}", headers={"content-type": "text/plain"})
    text = served.get("/metrics").text
    for status in ("200", "415"):
        name = f'aqe_requests_total{{route="/search",status="{status}"}}'
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert float(line.split()[-1]) >= 1
    assert 'aqe_request_seconds_count{route="/search"}' in text


def test_other_methods_and_paths_still_go_through_fastapi(clients):
    served, _ = clients
    assert served.get("/search").status_code == 405
    assert served.get("/healthz").json() == {"status": "ok"}
    assert "/search" in served.get("/openapi.json").json()["paths"]


def test_a_client_gone_before_its_body_is_not_answered(clients):
    served, _ = clients
    app = served.app
    sent: list[dict] = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/search",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    asyncio.run(app(scope, receive, send))
    assert sent == []


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False


def test_the_response_head_goes_out_with_the_first_body_bytes():
    transport = Recorder()
    view = HeadWithBody(transport)  # type: ignore[arg-type]
    view.write(CONTINUE)  # an interim answer is never held back
    assert transport.writes == [CONTINUE]
    view.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert transport.writes == [CONTINUE]
    view.write(b"ab")
    view.write(b"cd")
    assert transport.writes == [CONTINUE, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd"]
    assert view.is_closing() is False  # everything else is the transport's


def test_responses_over_a_real_connection_are_whole(built_root, tmp_path):
    """Through uvicorn and the guarded protocol: heads and bodies arrive intact, keep-alive works."""
    env = {"AQE_INDEX_ROOT": str(built_root), "AQE_RELOAD_INTERVAL_S": "0"}
    with serving(tmp_path / "log", env=env) as url, httpx.Client(base_url=url) as c:
        for _ in range(3):
            r = c.post("/search", json={"embedding": [0.5] * 32, "k": 2})
            assert r.status_code == 200 and len(r.json()["results"][0]) == 2
            assert c.get("/healthz").json() == {"status": "ok"}
        r = c.post("/search", content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in json.loads(r.content)["detail"]
