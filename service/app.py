"""The HTTP app: :func:`create_app` wires settings, the index manager, metrics and the routes.

The index is loaded (and then watched) in the lifespan, with FAISS's and BLAS's thread pools as
wide as one search may be; the batcher's threads live as long as the app. The routes are in
:mod:`service.routes`, the middlewares in :mod:`service.middleware` (``POST /search`` ahead of
FastAPI's layers, :class:`ServiceApp`, in :mod:`service.fast_path`), response and error bodies
in :mod:`service.render`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import faiss
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.types import Receive, Scope, Send
from threadpoolctl import threadpool_limits

from aqe_retrieval.errors import FilterError, QueryError, UnknownIdError
from service import openapi, render
from service.batcher import Batcher, Overloaded
from service.fast_path import SearchFastPath, is_search
from service.index_manager import IndexManager
from service.info import gauge_state
from service.metrics import Metrics
from service.middleware import BodyLimit, Observe, body_limit
from service.reloads import ReloadRequests
from service.routes import add_routes
from service.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the served version, watch for new ones and run the batcher while the app runs."""
    settings: Settings = app.state.settings
    manager: IndexManager = app.state.manager
    faiss.omp_set_num_threads(settings.threads)
    # numpy's BLAS pool is process-wide: as wide as a search may be, not as the machine
    blas = threadpool_limits(settings.threads, user_api="blas")
    manager.reload()
    manager.start_watching(settings.reload_interval_s)
    requests: ReloadRequests | None = None
    if settings.metrics_dir is not None:  # several workers: admin reloads reach them all
        requests = ReloadRequests(settings.metrics_dir, lambda: manager.reload(force=True))
        requests.start()
    app.state.reload_requests = requests
    app.state.batcher = Batcher(
        settings.batch_workers,
        settings.max_batch,
        settings.threads,
        settings.max_queue,
        on_drop=app.state.metrics.count_drop,
        on_loop=settings.searches_on_loop(),
    )
    try:
        yield
    finally:
        manager.stop()
        if requests is not None:
            requests.stop()
        app.state.batcher.close()
        app.state.metrics.close()
        blas.restore_original_limits()


class ServiceApp(FastAPI):
    """The FastAPI app, with ``POST /search`` answered ahead of FastAPI's own layers.

    :class:`service.fast_path.SearchFastPath` answers it (the same answers, errors and metrics
    as the documented route; see its module); every other request goes through FastAPI.
    """

    search_path: SearchFastPath

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /search`` to :attr:`search_path`, the rest to FastAPI."""
        if is_search(scope):
            return await self.search_path(scope, receive, send)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, manager: IndexManager | None = None) -> ServiceApp:
    """Build the app; the index is loaded and watched during the lifespan."""
    manager = manager or IndexManager.from_settings(settings)
    metrics = Metrics(lambda: gauge_state(manager, settings), settings.metrics_dir)
    manager.subscribe(metrics.count_reload)

    app = ServiceApp(
        title="AQE retrieval service",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by service.openapi, from local files
        redoc_url=None,
        description="Nearest gallery items for an embedding, with online alpha-weighted "
        "query expansion over a FAISS index published by `index-builder build`.",
    )
    limit = lambda: body_limit(settings, manager.searcher)  # noqa: E731
    app.add_middleware(BodyLimit, limit=limit)
    app.add_middleware(Observe, metrics=metrics)
    app.search_path = SearchFastPath(app, metrics, limit)
    app.state.manager, app.state.metrics, app.state.settings = manager, metrics, settings
    # the errors a search can raise for its caller's input, at their status in the one table
    for error in (QueryError, FilterError, UnknownIdError):
        app.add_exception_handler(error, render.domain_error)
    app.add_exception_handler(RequestValidationError, render.invalid_body)
    app.add_exception_handler(Overloaded, render.overloaded)
    add_routes(app)
    openapi.install(app)
    return app
