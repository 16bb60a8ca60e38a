"""The HTTP routes: a thin layer over the served :class:`~aqe_retrieval.searcher.Searcher`.

``POST /search`` is answered by :class:`service.fast_path.SearchFastPath`, a raw ASGI handler
ahead of FastAPI's middleware and routing; the route registered here for it is what the OpenAPI
document describes (and answers the same way, through :func:`service.fast_path.answer`). A
search never blocks the event loop for long: a lone small one on an idle batcher runs inline,
everything else on the :class:`~service.batcher.Batcher`'s threads (concurrent unfiltered
requests gathered into one FAISS call; FAISS releases the GIL); large answers are rendered in
Starlette's threadpool.

What the routes need lives on ``app.state`` (set by :func:`service.app.create_app`); the other
routes declare it once below as ``Annotated`` dependencies. Request bodies are decoded in
:mod:`service.search_request`; :func:`add_routes` puts the routes on an app.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import admin_items, fast_path
from service.index_manager import IndexManager
from service.info import info_summary
from service.metrics import Metrics
from service.schemas import ErrorResponse, SearchRequest, SearchResponse, ValidationErrorResponse
from service.settings import Settings

# /search reads its body itself (_parse_search_request); this puts its schema back in /docs
BINARY_QUERIES = {
    "schema": {"type": "string", "format": "binary"},
    "description": "float32 queries, row after row (octet-stream: little-endian, a whole number "
    "of d-long rows; x-npy: one np.save array of (d,) or (m, d), float32 or float64); the other "
    "fields as query parameters (filter as JSON)",
}
SEARCH_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "application/octet-stream": BINARY_QUERIES,
            "application/x-npy": BINARY_QUERIES,
        },
    }
}
# every status each route can answer, for the OpenAPI document
RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "the request cannot be answered as asked (dimension, values, k, batch, filter, "
        "min_score, not exactly one of embedding / embeddings / id / ids)",
    },
    404: {"model": ErrorResponse, "description": "an `id` / `ids` the served version does not hold"},
    413: {"model": ErrorResponse, "description": "body over AQE_MAX_BODY_BYTES or the largest legal batch"},
    415: {
        "model": ErrorResponse,
        "description": "body not declared application/json, application/octet-stream or application/x-npy",
    },
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


Manager = Annotated[IndexManager, Depends(app_manager)]
AppSettings = Annotated[Settings, Depends(app_settings)]
AppMetrics = Annotated[Metrics, Depends(app_metrics)]


async def search(request: Request) -> Response:
    """Nearest gallery items of each query, best first (JSON, float32 or .npy queries)."""
    # What /docs describes; in the app, service.fast_path.SearchFastPath answers POST /search
    # ahead of this route with the same service.fast_path.answer.
    started = time.monotonic()
    raw = await request.body()
    query = request.scope["query_string"].decode("latin-1")
    content_type = request.headers.get("content-type", "")
    body = await fast_path.answer(request.app.state, content_type, raw, query, started)
    return Response(body, media_type="application/json")


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
    ``POST /search`` is answered by :class:`service.fast_path.SearchFastPath` before routing; its
    APIRoute here is what the OpenAPI document describes (and answers the same way).
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
