"""How answers look on the wire: search results, and the bodies of refused requests.

Only the HTTP layer maps errors to status codes, and it does so through the one table,
:func:`aqe_retrieval.errors.http_status`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from aqe_retrieval.errors import http_status
from aqe_retrieval.searcher import Hit, Searcher
from service.batcher import Overloaded

# Answers with more hits than this are turned into JSON in the threadpool, not the event loop.
RENDER_INLINE_HITS = 2000
MAX_VALIDATION_ERRORS = 20


async def search_response(searcher: Searcher, hits: list[list[Hit]], with_metadata: bool) -> Response:
    """The JSON answer of a search as a response; large ones are rendered off the event loop."""
    return Response(await search_body(searcher, hits, with_metadata), media_type="application/json")


async def search_body(searcher: Searcher, hits: list[list[Hit]], with_metadata: bool) -> bytes:
    """The JSON body of a search's answer; large ones are rendered off the event loop."""
    if sum(len(row) for row in hits) <= RENDER_INLINE_HITS:
        return hits_json(searcher, hits, with_metadata)
    return await run_in_threadpool(hits_json, searcher, hits, with_metadata)


def render_hits(searcher: Searcher, hits: list[list[Hit]], with_metadata: bool) -> Response:
    """:func:`hits_json` as a JSON response."""
    return Response(hits_json(searcher, hits, with_metadata), media_type="application/json")


def hits_json(searcher: Searcher, hits: list[list[Hit]], with_metadata: bool) -> bytes:
    """Each hit as its external id and score (and metadata), under the served version.

    Encoded by orjson (what Starlette's JSONResponse does with the standard library's
    ``json.dumps``, several times faster; measured in the README's HTTP throughput notes).
    """
    results = [
        [
            {"id": searcher.external_id(h.row), "score": h.score}
            | ({"metadata": searcher.metadata(h.row)} if with_metadata else {})
            for h in row
        ]
        for row in hits
    ]
    return orjson.dumps({"index_version": searcher.version, "results": results})


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    """A query or filter the searcher refused: its message, at the table's status (400)."""
    return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))


async def overloaded(request: Request, exc: Exception) -> JSONResponse:
    """A search shed for load (queue full, deadline passed): 503, retry after a second."""
    assert isinstance(exc, Overloaded)
    return JSONResponse(
        {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)}
    )


async def invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """A body that is not a valid request: where and what, for the first few errors (422)."""
    # FastAPI's default echoes every offending input: a body of 100k bad values would come
    # back whole.
    assert isinstance(exc, RequestValidationError)
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
