"""The HTTP layer: a thin FastAPI app over :class:`~service.index_manager.IndexManager`.

Only this module maps errors to status codes. ``/search`` is a coroutine that never blocks the
event loop on a search: every search runs on the :class:`~service.batcher.Batcher`'s threads
(concurrent unfiltered requests gathered into one FAISS call; FAISS releases the GIL) and is
awaited there; the rendering of large answers runs in Starlette's threadpool. A small request
costs no thread hop besides the batcher's (benchmarks/bench_service.py).

Bodies are bounded before they are parsed: by ``AQE_MAX_BODY_BYTES`` and, once a version is
loaded, by what the largest legal batch can take (``AQE_MAX_BATCH`` x d numbers at
:data:`BYTES_PER_VALUE` each, plus :data:`BODY_ALLOWANCE` for the other fields), so an oversized
batch is refused from its ``content-length`` (or its first bytes over the limit) and never
becomes Python lists.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import faiss
import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from aqe_retrieval import artifact
from aqe_retrieval.errors import FilterError, QueryError
from aqe_retrieval.searcher import Hit, Searcher
from aqe_retrieval.status import staleness_seconds
from service.batcher import Batcher
from service.index_manager import IndexManager, ReloadOutcome
from service.metrics import Metrics
from service.schemas import ErrorResponse, SearchRequest, SearchResponse
from service.settings import Settings

logger = logging.getLogger(__name__)

# A JSON number as clients write it ("-0.012345678901234567, " with indentation) stays well
# under 64 bytes; the allowance covers the other fields (k, filter lists, flags).
BYTES_PER_VALUE = 64
BODY_ALLOWANCE = 1 << 20
MAX_VALIDATION_ERRORS = 20
# Answers with more hits than this are turned into JSON in the threadpool, not the event loop.
RENDER_INLINE_HITS = 2000

# /search reads its body itself (_parse_search_request); this puts its schema back in /docs
SEARCH_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SearchRequest.model_json_schema()}},
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the request cannot be answered as asked"},
    413: {"model": ErrorResponse, "description": "body over AQE_MAX_BODY_BYTES"},
    503: {"model": ErrorResponse, "description": "no index version loaded yet"},
}


class _BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``limit()`` bytes before they are read whole."""

    def __init__(self, app, limit: Callable[[], tuple[int, str]]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, why = self.limit()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(limit, why, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # No declared length (chunked): read up to the limit here, then replay it to the app.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _too_large(limit, why, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(limit: int, why: str, send) -> None:
    body = json.dumps({"detail": f"request body over the {limit}-byte limit ({why})"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Observe:
    """Pure ASGI middleware: count and time every request by route template and status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


async def current_searcher(request: Request) -> Searcher:
    """The searcher of the served version, taken once per request (503 before the first load)."""
    searcher = request.app.state.manager.searcher
    if searcher is None:
        raise HTTPException(503, "no index version is loaded yet")
    return searcher


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer-token check of admin routes (constant-time); off when no token is configured."""
    token = request.app.state.settings.admin_token
    if token is None:
        raise HTTPException(404, "admin routes are off: AQE_ADMIN_TOKEN is not set")
    expected = f"Bearer {token.get_secret_value()}".encode()
    if not hmac.compare_digest((authorization or "").encode(), expected):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


ServedIndex = Annotated[Searcher, Depends(current_searcher)]


def body_limit(settings: Settings, searcher: Searcher | None) -> tuple[int, str]:
    """The request body limit in bytes and where it comes from (the served version's d)."""
    limit, why = settings.max_body_bytes, "AQE_MAX_BODY_BYTES"
    if searcher is not None:
        batch = settings.max_batch * searcher.d * BYTES_PER_VALUE + BODY_ALLOWANCE
        if batch < limit:
            limit, why = batch, f"AQE_MAX_BATCH={settings.max_batch} queries of d={searcher.d}"
    return limit, why


def create_app(settings: Settings, manager: IndexManager | None = None) -> FastAPI:
    """Build the app; the index is loaded and watched during the lifespan."""
    manager = manager or IndexManager(
        settings.index_root, settings.verify_checksums, settings.mmap, settings.max_index_bytes
    )
    metrics = Metrics(lambda: _state(manager, settings))

    def on_reload(outcome: ReloadOutcome) -> None:
        if outcome.status == "loaded":
            metrics.reloads.inc()
        elif outcome.status == "failed":
            metrics.reload_failures.inc()

    manager.subscribe(on_reload)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        faiss.omp_set_num_threads(settings.threads)
        # numpy's BLAS pool is process-wide: as wide as a search may be, not as the machine
        blas = threadpool_limits(settings.threads, user_api="blas")
        manager.reload()
        manager.start_watching(settings.reload_interval_s)
        app.state.batcher = Batcher(settings.batch_workers, settings.max_batch, settings.threads)
        try:
            yield
        finally:
            manager.stop()
            app.state.batcher.close()
            blas.restore_original_limits()

    app = FastAPI(
        title="AQE retrieval service",
        version="0.1.0",
        lifespan=lifespan,
        description="Nearest gallery items for an embedding, with online alpha-weighted "
        "query expansion over a FAISS index published by `index-builder build`.",
    )
    app.add_middleware(_BodyLimit, limit=lambda: body_limit(settings, manager.searcher))
    app.add_middleware(_Observe, metrics=metrics)
    app.state.manager, app.state.metrics, app.state.settings = manager, metrics, settings

    @app.exception_handler(QueryError)
    @app.exception_handler(FilterError)
    async def bad_query(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes every offending input: a body of 100k bad values would come
        # back whole. Say where and what, for the first few.
        errors = exc.errors()
        detail: list[dict[str, Any]] = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors[:MAX_VALIDATION_ERRORS]
        ]
        if len(errors) > MAX_VALIDATION_ERRORS:
            detail.append(
                {
                    "loc": ["body"],
                    "msg": f"and {len(errors) - MAX_VALIDATION_ERRORS} more errors",
                    "type": "too_many_errors",
                }
            )
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/search", response_model=SearchResponse, responses=ERRORS, openapi_extra=SEARCH_REQUEST_BODY)
    async def search(request: Request, searcher: ServedIndex) -> Response:
        """Nearest gallery items of each query embedding, best first."""
        body = _parse_search_request(await request.body())
        queries = _queries(body, settings)
        if not 1 <= body.k <= settings.max_k:
            raise QueryError(f"k must be between 1 and {settings.max_k}, got {body.k}")
        metrics.queries.observe(len(queries))
        # on the batcher's threads; unfiltered queries share one FAISS call with concurrent ones
        hits = await app.state.batcher.submit_async(
            searcher, queries, body.k, expand=body.expand_query, filters=body.filter
        )
        if sum(len(row) for row in hits) <= RENDER_INLINE_HITS:
            return _render(searcher, hits, body.with_metadata)
        return await run_in_threadpool(_render, searcher, hits, body.with_metadata)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    def readyz() -> JSONResponse:
        """200 once a version is loaded and warmed up, else 503."""
        searcher = manager.searcher
        if searcher is None:
            return JSONResponse({"status": "not ready", "detail": "no index version loaded"}, 503)
        return JSONResponse({"status": "ready", "index_version": searcher.version})

    @app.get("/info")
    def info() -> dict[str, Any]:
        """The served version's manifest summary, reload state and nightly job status."""
        return _info(manager, settings)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus exposition."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", dependencies=[Depends(require_admin)])
    def admin_reload() -> JSONResponse:
        """Reload ``current`` now (even if it is the served version); 409 if it was refused."""
        outcome = manager.reload(force=True)
        body = {
            "status": outcome.status,
            "version": outcome.version,
            "error": outcome.error,
            "serving": manager.searcher.version if manager.searcher else None,
        }
        return JSONResponse(body, status_code=409 if outcome.status == "failed" else 200)

    return app


def _parse_search_request(raw: bytes) -> SearchRequest:
    """The body parsed and validated in one pass by pydantic-core (no Python-level JSON tree).

    Measured: the standard library's JSON decoding was a third of the event loop's time per
    request under load (py-spy, benchmarks/bench_service.py). Errors keep FastAPI's shape.
    """
    try:
        return SearchRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _render(searcher: Searcher, hits: list[list[Hit]], with_metadata: bool) -> Response:
    results = [
        [
            {"id": searcher.external_id(h.row), "score": h.score}
            | ({"metadata": searcher.metadata(h.row)} if with_metadata else {})
            for h in row
        ]
        for row in hits
    ]
    return JSONResponse({"index_version": searcher.version, "results": results})


def _queries(body: SearchRequest, settings: Settings) -> np.ndarray:
    if (body.embedding is None) == (body.embeddings is None):
        raise QueryError("send exactly one of 'embedding' (one query) or 'embeddings' (a batch)")
    rows = [body.embedding] if body.embedding is not None else body.embeddings
    assert rows is not None
    if not rows:
        raise QueryError("'embeddings' is empty")
    if len(rows) > settings.max_batch:
        raise QueryError(f"batch of {len(rows)} is over the limit of {settings.max_batch}")
    dims = {len(r) for r in rows}
    if len(dims) != 1:
        raise QueryError(f"embeddings of different lengths {sorted(dims)} in one batch")
    if 0 in dims:
        raise QueryError("empty embedding")
    # float64: the searcher checks the values (NaN, Inf, beyond float32) before narrowing them
    return np.asarray(rows, dtype=np.float64)


def _nightly(settings: Settings) -> dict[str, Any] | None:
    record = artifact.read_status(settings.index_root)
    if record is None:
        return None
    age = staleness_seconds(record, time.time())
    return {**record, "staleness_s": age, "stale": age is None or age > settings.stale_after_s}


def _state(manager: IndexManager, settings: Settings) -> dict[str, Any]:
    s = manager.searcher
    state: dict[str, Any] = {}
    job = _nightly(settings)
    if job is not None:
        state["nightly_staleness_seconds"] = job["staleness_s"]
        state["nightly_consecutive_failures"] = job["consecutive_failures"]
    if s is not None:
        state.update(version=s.version, n=s.n, created_at=s.manifest.created_at.timestamp())
    if manager.last_failure is not None:
        state["last_reload_failure_at"] = manager.last_failure.at
    return state


def _info(manager: IndexManager, settings: Settings) -> dict[str, Any]:
    s = manager.searcher
    out: dict[str, Any] = {"index_version": s.version if s else None, "ready": s is not None}
    if s is not None:
        m = s.manifest
        out.update(
            n=m.n,
            d=m.d,
            qe_k=m.qe_k,
            effective_qe_k=m.effective_qe_k,
            alpha=m.alpha,
            qe_times=m.qe_times,
            knn=m.knn,
            graph_recall=m.graph_recall,
            serving_index=m.serving_index.model_dump(),
            metadata_columns=[c.name for c in m.metadata],
            built_at=m.created_at.isoformat(),
            loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.loaded_at)),
            quality=m.quality,
        )
    out["nightly"] = _nightly(settings)
    f = manager.last_failure
    out["last_reload_failure"] = (
        None
        if f is None
        else {
            "version": f.version,
            "error": f.error,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(f.at)),
        }
    )
    return out
