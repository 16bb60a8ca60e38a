"""``POST /search`` as a raw ASGI handler, ahead of FastAPI's middleware and routing.

The request path of a search is the service's hot path; measured in process (200,000 x 256,
HNSW serving, the search itself replaced by a constant answer) it cost 198 us a request through
the FastAPI app (its telemetry, error, exception and exit-stack middlewares, routing,
``Request``, the body middlewares) and 116 us through :class:`SearchFastPath`. The app
(:class:`service.app.ServiceApp`) hands ``POST /search`` to it before any of those layers and
every other request to FastAPI unchanged.

What it keeps of the layers it skips, so a search is answered exactly as through them:

- the body limit of :class:`~service.middleware.BodyLimit` (``413`` from ``content-length`` or
  the first bytes over it) and the metrics of :class:`~service.middleware.Observe` (route label
  ``/search``, ``unmatched`` for a 413 refused before routing; ``499`` for a client that went
  away);
- every error through the app's own exception handlers (``app.exception_handlers``: the same
  400/404/415/422/503 bodies and ``Retry-After``); an unexpected error propagates to the server
  (uvicorn answers 500 and logs it);
- the search itself is :func:`answer`, which the documented FastAPI route (``/docs``, the
  OpenAPI contract) runs too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from aqe_retrieval.searcher import Searcher
from service import render, search_request
from service.batcher import DeadlineExceeded
from service.metrics import Metrics
from service.middleware import too_large
from service.settings import Settings

ROUTE = "/search"
UNROUTED = "unmatched"
"""The route label of a request refused before routing (:class:`~service.middleware.Observe`'s)."""
PARSE_INLINE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (a thread hop costs more than parsing them)."""
JSON_HEADERS = [(b"content-type", b"application/json")]


async def answer(state: State, content_type: str, raw: bytes, query: str, started: float) -> bytes:
    """The JSON answer of one ``/search`` request, from its app's state and its body.

    ``query`` is the raw query string (the options of a binary body), ``started`` the request's
    ``time.monotonic()`` start (its deadline, ``AQE_REQUEST_TIMEOUT_S``, runs from there). Raises
    the errors the app's exception handlers answer (HTTPException, RequestValidationError, the
    searcher's and the batcher's).
    """
    searcher: Searcher | None = state.manager.searcher
    if searcher is None:
        raise HTTPException(503, "no index version is loaded yet")
    settings: Settings = state.settings
    kind = search_request.media_kind(content_type)
    params = dict(parse_qsl(query, keep_blank_values=True)) if kind != search_request.JSON else {}
    if len(raw) <= PARSE_INLINE_BYTES:
        body, queries = search_request.read(kind, raw, params, settings, searcher)
    else:  # a large body is parsed off the event loop, so /healthz and small requests go on
        body, queries = await run_in_threadpool(search_request.read, kind, raw, params, settings, searcher)
    left = settings.request_timeout_s - (time.monotonic() - started)
    if left <= 0:
        raise DeadlineExceeded(f"request deadline of {settings.request_timeout_s:g} s passed while parsing")
    state.metrics.queries.observe(len(queries))
    # inline when the batcher is idle, else on its threads, where unfiltered queries share one
    # FAISS call with concurrent ones. A client that hangs up cancels this task
    # (service.protocol), which drops the queued job.
    raw_mode = body.mode == "raw"
    hits = await state.batcher.search_async(
        searcher,
        queries,
        body.k,
        expand=body.expand_query and not raw_mode,
        filters=body.filter,
        timeout_s=left,
        raw=raw_mode,
    )
    if body.min_score is not None:  # per request: a batch mixes requests of different floors
        floor = body.min_score
        hits = [[h for h in row if h.score >= floor] for row in hits]
    return await render.search_body(searcher, hits, body.with_metadata)


def is_search(scope: Scope) -> bool:
    """Whether ``scope`` is a ``POST /search`` request."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == ROUTE


class SearchFastPath:
    """``POST /search`` of ``app`` as a raw ASGI handler (:meth:`__call__`, for :func:`is_search`)."""

    def __init__(self, app: Any, metrics: Metrics, limit: Callable[[], tuple[int, str]]) -> None:
        self.app, self.limit = app, limit
        self.latency = metrics.latency.labels(ROUTE)
        self._requests = metrics.requests
        self._counted: dict[int, Any] = {}  # status -> its counter child, made on first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ``POST /search`` request, with its metrics."""
        t0 = time.perf_counter()
        status = 500
        try:
            status = await self._search(scope, receive, send)
        except asyncio.CancelledError:
            status = 499  # the client went away before its answer (nginx's code for it)
            raise
        finally:
            counter = self._counted.get(status)
            if counter is None:
                # a body over the limit is refused before routing, as the body middleware does
                route = UNROUTED if status == 413 else ROUTE
                counter = self._counted[status] = self._requests.labels(route, str(status))
            counter.inc()
            self.latency.observe(time.perf_counter() - t0)

    async def _search(self, scope: Scope, receive: Receive, send: Send) -> int:
        started = time.monotonic()
        content_type, length = "", None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        limit, why = self.limit()
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(limit, why, send)
            return 413
        chunks: list[bytes] = []
        seen, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return 499
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await too_large(limit, why, send)
                return 413
            chunks.append(chunk)
            more = message.get("more_body", False)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        app = self.app
        try:
            query = scope["query_string"].decode("latin-1")
            body = await answer(app.state, content_type, raw, query, started)
        except Exception as exc:
            handler = _handler(app.exception_handlers, exc)
            if handler is None:
                raise  # Starlette's ServerErrorMiddleware answers 500 and logs it
            response = await handler(Request(scope), exc)
            await response(scope, receive, send)
            return response.status_code
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*JSON_HEADERS, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return 200


def _handler(handlers: dict[Any, Callable[..., Any]], exc: Exception) -> Callable[..., Any] | None:
    """The app's handler of ``exc``'s class or its nearest base (as Starlette looks them up)."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
