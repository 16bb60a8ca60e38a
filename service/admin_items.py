"""``POST /admin/items`` and ``DELETE /admin/items``: add or delete gallery items over HTTP.

Off by default: they answer 404, as admin routes do when off, unless both ``AQE_ADMIN_TOKEN``
and ``AQE_ALLOW_WRITES`` are set, and then only for the admin's bearer token. The work is
:func:`aqe_retrieval.incremental.apply_change`, the code behind ``index-builder add``/``delete``
(the service never imports the builder): it takes the root's build lock (409 when a build or
another change holds it), logs the change (``ROOT/changes/``, folded into the next full build),
publishes a new version, and the route reloads it in this worker and asks every other worker
to (:mod:`service.reloads`). The operation's fingerprint is BLAKE2b over the body's content:
a retried request publishes nothing and answers the version that holds it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aqe_retrieval import incremental
from aqe_retrieval.errors import AqeError, http_status
from service.index_manager import IndexManager
from service.schemas import ErrorResponse
from service.settings import Settings


class AddItemsRequest(BaseModel):
    """New gallery rows: raw embeddings, one id each, and the version's metadata columns."""

    model_config = ConfigDict(extra="forbid")
    embeddings: list[list[float]] = Field(min_length=1, description="raw rows (m, d)")
    ids: list[str] = Field(min_length=1, description="one new id per row")
    metadata: dict[str, list[Any]] | None = Field(
        None, description="column name -> m values: every metadata column of the version"
    )


class DeleteItemsRequest(BaseModel):
    """Gallery ids to delete (every one must be in the current version)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=1)


class ItemsResponse(BaseModel):
    """The version that holds the change, and what this worker serves now."""

    version: str
    applied: bool = Field(description="false: a retry; the version already held this operation")
    n: int
    changed_rows: list[int] = Field(description="rows re-expanded per level")
    seconds: float
    serving: str | None
    workers: str = Field(description="'all': every worker was asked to reload; 'this': one worker")


ITEM_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "dimension, values, duplicate ids or metadata columns"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {
        "model": ErrorResponse,
        "description": "writes are off (AQE_ADMIN_TOKEN or AQE_ALLOW_WRITES unset), or (DELETE) an "
        "id the current version does not hold",
    },
    409: {"model": ErrorResponse, "description": "a build or another change holds the build lock"},
    415: {"model": ErrorResponse, "description": "body not declared application/json"},
    422: {"description": "body is not JSON or not such a request"},
    503: {"model": ErrorResponse, "description": "nothing published yet, or the index root is unusable"},
}


def require_writes(request: Request) -> None:
    """404 unless ``AQE_ALLOW_WRITES`` is set (after the admin check: the route looks absent)."""
    if not request.app.state.settings.allow_writes:
        raise HTTPException(404, "writes are off: AQE_ALLOW_WRITES is not set")


def _fingerprint(kind: str, payload: dict[str, Any], rows: np.ndarray | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    if rows is not None:
        h.update(repr(rows.shape).encode())
        h.update(rows.tobytes())
    return f"http-{kind}:{h.hexdigest()}"


def _apply(request: Request, change: incremental.Change) -> JSONResponse:
    settings: Settings = request.app.state.settings
    manager: IndexManager = request.app.state.manager
    try:
        outcome = incremental.apply_change(settings.index_root, change, settings.write_keep)
    except AqeError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))
    except OSError as exc:  # a read-only or full index root: nothing was published
        return JSONResponse({"detail": f"cannot write the index root: {exc}"}, status_code=503)
    fanout = request.app.state.reload_requests
    if outcome.applied and fanout is not None:
        fanout.request()
    manager.reload(force=True)
    m = outcome.manifest
    body = ItemsResponse(
        version=m.version,
        applied=outcome.applied,
        n=m.n,
        changed_rows=outcome.changed_rows,
        seconds=round(outcome.seconds, 4),
        serving=manager.searcher.version if manager.searcher else None,
        workers="all" if fanout is not None else "this",
    )
    return JSONResponse(body.model_dump())


async def add_items(request: Request, body: AddItemsRequest) -> JSONResponse:
    """Add gallery items exactly (as a rebuild would) and publish a new version."""
    dims = {len(r) for r in body.embeddings}
    if len(dims) != 1:
        raise HTTPException(400, f"embeddings of different lengths {sorted(dims)} in one request")
    rows = np.asarray(body.embeddings, dtype=np.float64)
    if np.isfinite(rows).all() and (np.abs(rows) > np.finfo(np.float32).max).any():
        raise HTTPException(400, "embedding values beyond float32")
    rows32 = rows.astype(np.float32)
    payload = {"ids": body.ids, "metadata": body.metadata or {}}
    change = incremental.Change(
        _fingerprint("add", payload, rows32),
        rows=rows32,
        ids=body.ids,
        metadata={name: np.asarray(values) for name, values in (body.metadata or {}).items()},
    )
    return await run_in_threadpool(_apply, request, change)


async def delete_items(request: Request, body: DeleteItemsRequest) -> JSONResponse:
    """Delete gallery items by id and publish a new version."""
    change = incremental.Change(_fingerprint("delete", {"ids": body.ids}, None), delete=body.ids)
    return await run_in_threadpool(_apply, request, change)
