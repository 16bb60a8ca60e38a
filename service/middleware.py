"""The service's pure ASGI middlewares: the request body limit and the request metrics.

Bodies are bounded before they are parsed: by ``AQE_MAX_BODY_BYTES`` and, once a version is
loaded, by what the largest legal batch can take (``AQE_MAX_BATCH`` x d numbers at
:data:`BYTES_PER_VALUE` each, plus :data:`BODY_ALLOWANCE` for the other fields), so an oversized
batch is refused from its ``content-length`` (or its first bytes over the limit) and never
becomes Python lists.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aqe_retrieval.searcher import Searcher
from service.metrics import Metrics
from service.settings import Settings

# A JSON number as clients write it ("-0.012345678901234567, " with indentation) stays well
# under 64 bytes; the allowance covers the other fields (k, filter lists, flags).
BYTES_PER_VALUE = 64
BODY_ALLOWANCE = 1 << 20


def body_limit(settings: Settings, searcher: Searcher | None) -> tuple[int, str]:
    """The request body limit in bytes and where it comes from (the served version's d)."""
    limit, why = settings.max_body_bytes, "AQE_MAX_BODY_BYTES"
    if searcher is not None:
        batch = settings.max_batch * searcher.d * BYTES_PER_VALUE + BODY_ALLOWANCE
        if batch < limit:
            limit, why = batch, f"AQE_MAX_BATCH={settings.max_batch} queries of d={searcher.d}"
    return limit, why


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``limit()`` bytes before they are read whole."""

    def __init__(self, app: ASGIApp, limit: Callable[[], tuple[int, str]]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, why = self.limit()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large(limit, why, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # No declared length (chunked): read up to the limit here, then replay it to the app.
        chunks: list[bytes] = []
        seen, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await too_large(limit, why, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def too_large(limit: int, why: str, send: Send) -> None:
    """Answer 413: the body is over ``limit`` bytes (``why``: where the limit comes from)."""
    body = json.dumps({"detail": f"request body over the {limit}-byte limit ({why})"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Observe:
    """Pure ASGI middleware: count and time every request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except asyncio.CancelledError:
            status = 499  # the client went away before its answer (nginx's code for it)
            raise
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)
