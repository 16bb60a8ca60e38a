"""The ASGI middlewares on their own: the body limit and the request metrics, no HTTP app."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from service.metrics import Metrics
from service.middleware import BODY_ALLOWANCE, BYTES_PER_VALUE, BodyLimit, Observe, body_limit
from service.settings import Settings


def http_scope(headers: dict[bytes, bytes] | None = None, route: object = None) -> dict:
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": list((headers or {}).items())}
    if route is not None:
        scope["route"] = route
    return scope


class Echo:
    """An ASGI app that reads the whole body and answers it back (and remembers its messages)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            self.messages.append(message)
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def call(app, scope: dict, chunks: list[bytes]) -> list[dict]:
    """Run ``app`` on ``scope`` with the body in ``chunks``; the messages it sent."""
    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_the_limit_is_the_setting_until_a_version_is_loaded(tmp_path):
    settings = Settings(index_root=tmp_path, max_batch=8, max_body_bytes=1 << 30)
    assert body_limit(settings, None) == (1 << 30, "AQE_MAX_BODY_BYTES")
    limit, why = body_limit(settings, SimpleNamespace(d=32))
    assert limit == 8 * 32 * BYTES_PER_VALUE + BODY_ALLOWANCE
    assert why == "AQE_MAX_BATCH=8 queries of d=32"
    small = Settings(index_root=tmp_path, max_batch=8, max_body_bytes=4096)
    assert body_limit(small, SimpleNamespace(d=32)) == (4096, "AQE_MAX_BODY_BYTES")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_bodies_within_the_limit_reach_the_app_whole(declared):
    echo = Echo()
    chunks = [b"a" * 40, b"b" * 40, b"c" * 20]
    headers = {b"content-length": b"100"} if declared else {}
    sent = call(BodyLimit(echo, lambda: (100, "why")), http_scope(headers), chunks)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"".join(chunks)
    # a declared length streams through; a chunked body is read here and replayed as one message
    assert len(echo.messages) == (3 if declared else 1)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_bodies_over_the_limit_get_413_and_never_reach_the_app(declared):
    echo = Echo()
    headers = {b"content-length": b"101"} if declared else {}
    sent = call(BodyLimit(echo, lambda: (100, "the reason")), http_scope(headers), [b"x" * 60, b"y" * 41])
    start, body = sent
    assert start["status"] == 413
    length = str(len(body["body"])).encode()
    assert dict(start["headers"]) == {b"content-type": b"application/json", b"content-length": length}
    assert json.loads(body["body"]) == {"detail": "request body over the 100-byte limit (the reason)"}
    assert echo.messages == []


def test_a_client_that_leaves_mid_body_gets_no_answer():
    echo = Echo()
    sent = call(BodyLimit(echo, lambda: (100, "why")), http_scope(), [])  # disconnect first
    assert sent == [] and echo.messages == []


def count(metrics: Metrics, route: str, status: str) -> float | None:
    return metrics.registry.get_sample_value("aqe_requests_total", {"route": route, "status": status})


def test_requests_are_counted_by_route_template_and_status():
    metrics = Metrics(dict)
    call(Observe(Echo(), metrics), http_scope(route=SimpleNamespace(path="/items/{id}")), [b""])
    call(Observe(Echo(), metrics), http_scope(), [b""])
    assert count(metrics, "/items/{id}", "200") == 1
    assert count(metrics, "unmatched", "200") == 1


def test_an_app_that_raises_is_counted_as_a_500():
    metrics = Metrics(dict)

    async def broken(scope, receive, send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        call(Observe(broken, metrics), http_scope(), [b""])
    assert count(metrics, "unmatched", "500") == 1


def test_other_scopes_pass_through_untouched():
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    for middleware in (BodyLimit(app, lambda: (0, "")), Observe(app, Metrics(dict))):
        asyncio.run(middleware({"type": "lifespan"}, None, None))
    assert seen == ["lifespan", "lifespan"]
