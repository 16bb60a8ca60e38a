"""The OpenAPI document of the served index, and the docs pages, served without a CDN.

The document says what the served version accepts: ``embedding`` and every row of
``embeddings`` have exactly d items (``minItems`` = ``maxItems`` = d), and the examples are
vectors of that length (an example of another length would be refused with a 400). An example
searches by the id of the version's first item. It is built on first request and again whenever
the served version's d or first id changes (a reload), so it is never
older than the index it describes.

``/docs`` (Swagger UI) and ``/redoc`` load their scripts and styles from this service
(:data:`STATIC_URL`), from the files the ``fastapi-offline`` package ships: an air-gapped
deployment gets working pages, and a browser opening them contacts no third party.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs-static"


def static_dir() -> str:
    """The Swagger UI and ReDoc files (``swagger-ui-bundle.js``, ``swagger-ui.css``,
    ``redoc.standalone.js``, ``favicon.png``) that the ``fastapi-offline`` package ships."""
    return str(importlib.resources.files("fastapi_offline") / "static")


def example_vector(d: int, seed: int) -> list[float]:
    """A d-long example embedding (deterministic, nonzero, three decimals)."""
    return [round(((i * 7919 + seed * 104729) % 2001 - 1000) / 1000, 3) or 0.5 for i in range(d)]


def examples(d: int, example_id: str = "0") -> dict[str, dict[str, Any]]:
    """Request bodies that the served version (dimension ``d``, an item ``example_id``) answers with a 200."""
    return {
        "one query": {"value": {"embedding": example_vector(d, 1), "k": 5}},
        "more like a gallery item, above a score": {"value": {"id": example_id, "k": 5, "min_score": 0.5}},
        "plain kNN (no AQE), for A/B": {"value": {"embedding": example_vector(d, 4), "mode": "raw"}},
        "a batch, with metadata": {
            "value": {
                "embeddings": [example_vector(d, 2), example_vector(d, 3)],
                "k": 3,
                "with_metadata": True,
            }
        },
    }


def with_dimension(schema: dict[str, Any], d: int | None, example_id: str = "0") -> dict[str, Any]:
    """``schema`` (the whole document) with /search's body tied to dimension ``d`` (in place).

    ``d=None`` (nothing loaded yet): no dimension and no examples, rather than wrong ones.
    """
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]
    request = body["schema"]
    request.pop("examples", None)
    body.pop("examples", None)
    if d is None:
        return schema
    props = request["properties"]
    [one] = [s for s in props["embedding"]["anyOf"] if s.get("type") == "array"]
    one.update(minItems=d, maxItems=d)
    [batch] = [s for s in props["embeddings"]["anyOf"] if s.get("type") == "array"]
    batch["items"].update(minItems=d, maxItems=d)
    body["examples"] = examples(d, example_id)
    return schema


def install(app: FastAPI) -> None:
    """Serve ``/openapi.json`` for the served dimension, and ``/docs`` and ``/redoc`` locally."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        searcher = app.state.manager.searcher
        d = searcher.d if searcher is not None else None
        example_id = searcher.external_id(0) if searcher is not None else "0"
        if app.openapi_schema is None or cached.get("key") != (d, example_id):
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = with_dimension(schema, d, example_id)
            cached["key"] = (d, example_id)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon.png",
        )

    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )

    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_URL, StaticFiles(directory=static_dir()), name="docs-static")
