"""The HTTP routes: a thin layer over the served :class:`~aqe_retrieval.searcher.Searcher`.

``/search`` is a coroutine that never blocks the event loop on a search: every search runs on
the :class:`~service.batcher.Batcher`'s threads (concurrent unfiltered requests gathered into one
FAISS call; FAISS releases the GIL) and is awaited there; the rendering of large answers runs in
Starlette's threadpool. A small request costs no thread hop besides the batcher's
(benchmarks/bench_service.py).

What the routes need lives on ``app.state`` (set by :func:`service.app.create_app`) and is
declared once below as ``Annotated`` dependencies; :func:`add_routes` puts the routes on an app.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from aqe_retrieval.errors import QueryError
from aqe_retrieval.searcher import Searcher
from service import admin_items, render
from service.batcher import DeadlineExceeded
from service.index_manager import IndexManager
from service.info import info_summary
from service.metrics import Metrics
from service.schemas import ErrorResponse, SearchRequest, SearchResponse, ValidationErrorResponse
from service.settings import Settings

# bodies up to this size are parsed on the event loop (a thread hop costs more than parsing them)
PARSE_INLINE_BYTES = 64 * 1024

# /search reads its body itself (_parse_search_request); this puts its schema back in /docs
SEARCH_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SearchRequest.model_json_schema()}},
    }
}
# every status each route can answer, for the OpenAPI document
RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "the request cannot be answered as asked (dimension, values, k, batch, filter)",
    },
    413: {"model": ErrorResponse, "description": "body over AQE_MAX_BODY_BYTES or the largest legal batch"},
    415: {"model": ErrorResponse, "description": "body not declared application/json"},
    422: {"model": ValidationErrorResponse, "description": "body is not JSON or not a search request"},
    503: {
        "model": ErrorResponse,
        "description": "no index version loaded yet, or overloaded: search queue full "
        "(AQE_MAX_QUEUE) or no answer within AQE_REQUEST_TIMEOUT_S",
        "headers": RETRY,
    },
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "admin routes are off: AQE_ADMIN_TOKEN is not set"},
    415: {"model": ErrorResponse, "description": "a body that is not declared application/json"},
}


async def current_searcher(request: Request) -> Searcher:
    """The searcher of the served version, taken once per request (503 before the first load)."""
    searcher = request.app.state.manager.searcher
    if searcher is None:
        raise HTTPException(503, "no index version is loaded yet")
    return searcher


async def app_manager(request: Request) -> IndexManager:
    """The app's :class:`IndexManager` (which version is served, reloads)."""
    return request.app.state.manager


async def app_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


async def app_metrics(request: Request) -> Metrics:
    """The app's Prometheus metrics."""
    return request.app.state.metrics


def is_admin(settings: Settings, authorization: str | None) -> bool:
    """Whether ``authorization`` is ``Bearer <AQE_ADMIN_TOKEN>`` (constant-time; False when unset)."""
    token = settings.admin_token
    if token is None:
        return False
    expected = f"Bearer {token.get_secret_value()}".encode()
    return hmac.compare_digest((authorization or "").encode(), expected)


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer-token check of admin routes (constant-time); off when no token is configured."""
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise HTTPException(404, "admin routes are off: AQE_ADMIN_TOKEN is not set")
    if not is_admin(settings, authorization):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


ServedIndex = Annotated[Searcher, Depends(current_searcher)]
Manager = Annotated[IndexManager, Depends(app_manager)]
AppSettings = Annotated[Settings, Depends(app_settings)]
AppMetrics = Annotated[Metrics, Depends(app_metrics)]


async def search(request: Request, searcher: ServedIndex) -> Response:
    """Nearest gallery items of each query embedding, best first."""
    # The hot path: app state read directly, no dependencies beyond the searcher's.
    state = request.app.state
    settings: Settings = state.settings
    started = time.monotonic()
    require_json(request)
    raw = await request.body()
    if len(raw) <= PARSE_INLINE_BYTES:
        body, queries = _read_search_request(raw, settings)
    else:  # a large body is parsed off the event loop, so /healthz and small requests go on
        body, queries = await run_in_threadpool(_read_search_request, raw, settings)
    left = settings.request_timeout_s - (time.monotonic() - started)
    if left <= 0:
        raise DeadlineExceeded(f"request deadline of {settings.request_timeout_s:g} s passed while parsing")
    state.metrics.queries.observe(len(queries))
    # on the batcher's threads; unfiltered queries share one FAISS call with concurrent ones.
    # A client that hangs up cancels this task (service.protocol), which drops the queued job.
    hits = await state.batcher.submit_async(
        searcher, queries, body.k, expand=body.expand_query, filters=body.filter, timeout_s=left
    )
    return await render.search_response(searcher, hits, body.with_metadata)


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON: a browser page may POST text/plain or a form
    cross-origin without a preflight, and would make us parse (and search) what it sends."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(415, f"the body must be application/json, not {media or 'undeclared'}")


def require_json_if_body(request: Request) -> None:
    """415 for a POST without a JSON body declared but with a body or a content type (admin)."""
    headers = request.headers
    if (
        "content-type" in headers
        or headers.get("content-length", "0") != "0"
        or "transfer-encoding" in headers
    ):
        require_json(request)


async def healthz() -> dict[str, str]:
    """The process is alive (answered on the event loop: no threadpool slot needed)."""
    return {"status": "ok"}


async def readyz(manager: Manager) -> JSONResponse:
    """200 once a version is loaded and warmed up, else 503."""
    searcher = manager.searcher
    if searcher is None:
        return JSONResponse({"status": "not ready", "detail": "no index version loaded"}, 503)
    return JSONResponse({"status": "ready", "index_version": searcher.version})


def info(
    manager: Manager, settings: AppSettings, authorization: Annotated[str | None, Header()] = None
) -> dict[str, Any]:
    """The served version's manifest summary, reload state and nightly job status.

    Host names, pids and error texts only with ``Authorization: Bearer $AQE_ADMIN_TOKEN``.
    """
    return info_summary(manager, settings, private=is_admin(settings, authorization))


def prometheus(metrics: AppMetrics) -> PlainTextResponse:
    """Prometheus exposition."""
    return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def admin_reload(request: Request, manager: Manager) -> JSONResponse:
    """Reload ``current`` now (even if it is the served version); 409 if it was refused.

    The outcome is this worker's; with several workers every other one is asked to reload
    too (``"workers": "all"``) and does so within a second.
    """
    fanout = request.app.state.reload_requests
    if fanout is not None:
        fanout.request()
    outcome = manager.reload(force=True)
    body = {
        "status": outcome.status,
        "version": outcome.version,
        "error": outcome.error,
        "serving": manager.searcher.version if manager.searcher else None,
        "workers": "all" if fanout is not None else "this",
    }
    return JSONResponse(body, status_code=409 if outcome.status == "failed" else 200)


def add_routes(app: FastAPI) -> None:
    """Register the routes on ``app``'s own router.

    Not through an included ``APIRouter``: FastAPI resolves an included router on every request
    (a second match, scope bookkeeping), work the tuned ``/search`` path did not do before.
    """
    app.add_api_route(
        "/search",
        search,
        methods=["POST"],
        response_model=SearchResponse,
        responses=ERRORS,
        openapi_extra=SEARCH_REQUEST_BODY,
    )
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route(
        "/readyz", readyz, methods=["GET"], responses={503: {"description": "no version loaded yet"}}
    )
    app.add_api_route("/info", info, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route(
        "/admin/reload",
        admin_reload,
        methods=["POST"],
        dependencies=[Depends(require_admin), Depends(require_json_if_body)],
        responses={**ADMIN_ERRORS, 409: {"description": "the version was refused; the old one serves on"}},
    )
    writes = [Depends(require_admin), Depends(require_json), Depends(admin_items.require_writes)]
    for method, endpoint in (("POST", admin_items.add_items), ("DELETE", admin_items.delete_items)):
        app.add_api_route(
            "/admin/items",
            endpoint,
            methods=[method],
            dependencies=writes,
            response_model=admin_items.ItemsResponse,
            responses=admin_items.ITEM_ERRORS,
        )


def _read_search_request(raw: bytes, settings: Settings) -> tuple[SearchRequest, np.ndarray]:
    """The parsed body and its queries as a float64 matrix (all checks but the searcher's)."""
    body = _parse_search_request(raw)
    queries = _queries(body, settings)
    if not 1 <= body.k <= settings.max_k:
        raise QueryError(f"k must be between 1 and {settings.max_k}, got {body.k}")
    return body, queries


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


def _queries(body: SearchRequest, settings: Settings) -> np.ndarray:
    """The request's embeddings as one float64 matrix, after the checks of its shape."""
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
