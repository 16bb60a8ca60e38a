"""A ``/search`` request's body, in any of its encodings, turned into its options and queries.

Three media types are accepted:

- ``application/json`` (and ``+json`` types): a :class:`~service.schemas.SearchRequest`, parsed
  and validated in one pass by pydantic-core (no Python-level JSON tree).
- ``application/octet-stream``: the queries as little-endian float32, row after row; the row
  length is the served d, so the body must be a whole number of ``4 * d`` bytes.
- ``application/x-npy``: one ``.npy`` array (``np.save``), float32 or float64, of shape (d,) or
  (m, d); never unpickled.

With a binary body the other fields of the request (``k``, ``mode``, ``expand_query``,
``min_score``, ``with_metadata``, and ``filter`` as JSON) come from the query string and are
validated by the same model. Anything else is a 415: a browser page may POST ``text/plain``, a
form or ``multipart`` cross-origin without a preflight, and would make us search what it sends;
the binary types need a preflight, as JSON does.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from aqe_retrieval.errors import QueryError
from aqe_retrieval.searcher import Searcher
from service.schemas import SearchRequest
from service.settings import Settings

JSON, FLOAT32, NPY = "json", "float32", "npy"
BINARY_MEDIA = {"application/octet-stream": FLOAT32, "application/x-npy": NPY}
QUERY_FIELDS = ("embedding", "embeddings", "id", "ids")
"""The fields that carry a request's queries: exactly one per request."""


def media_kind(content_type: str) -> str:
    """:data:`JSON`, :data:`FLOAT32` or :data:`NPY` for a ``content-type`` header; else a 415."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return JSON
    if media in BINARY_MEDIA:
        return BINARY_MEDIA[media]
    raise HTTPException(
        415,
        "the body must be application/json (or float32 queries as application/octet-stream or "
        f"application/x-npy), not {media or 'undeclared'}",
    )


def read(
    kind: str, raw: bytes, params: dict[str, str], settings: Settings, searcher: Searcher
) -> tuple[SearchRequest, np.ndarray]:
    """The request's options and its queries (float64 or float32 rows; the searcher checks values)."""
    if kind == JSON:
        body = parse_json(raw)
        queries = json_queries(body, settings, searcher)
    else:
        body = parse_params(params)
        queries = binary_queries(kind, raw, searcher.d)
        if len(queries) > settings.max_batch:
            raise QueryError(f"batch of {len(queries)} is over the limit of {settings.max_batch}")
    check_options(body, settings)
    return body, queries


def parse_json(raw: bytes) -> SearchRequest:
    """A JSON body parsed and validated in one pass (errors keep FastAPI's shape).

    Measured: the standard library's JSON decoding was a third of the event loop's time per
    request under load (py-spy, benchmarks/bench_service.py).
    """
    try:
        return SearchRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc, "body") from None


def parse_params(params: dict[str, str]) -> SearchRequest:
    """The options of a binary request, from its query string (``filter`` as JSON)."""
    given = [name for name in QUERY_FIELDS if name in params]
    if given:
        raise QueryError(f"a binary body carries the queries: {', '.join(given)} cannot be a parameter")
    fields: dict[str, Any] = dict(params)
    if "filter" in fields:
        try:
            fields["filter"] = json.loads(fields["filter"])
        except ValueError:
            raise QueryError("the filter parameter must be a JSON object") from None
    try:
        return SearchRequest.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc, "query") from None


def binary_queries(kind: str, raw: bytes, d: int) -> np.ndarray:
    """The (m, d) rows of a float32 or ``.npy`` body (400 for a wrong length, shape or dtype)."""
    if kind == FLOAT32:
        if not raw:
            raise QueryError("the body holds no queries")
        if len(raw) % (4 * d):
            raise QueryError(
                f"a float32 body of {len(raw)} bytes is not a whole number of rows of "
                f"dimension {d} ({4 * d} bytes each)"
            )
        return np.frombuffer(raw, dtype="<f4").reshape(-1, d)
    buffer = io.BytesIO(raw)
    try:
        array = np.load(buffer, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise QueryError(f"the body is not one .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype not in (np.float32, np.float64):
        raise QueryError(f"a .npy body must hold float32 or float64, got {getattr(array, 'dtype', '?')}")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise QueryError(f"a .npy body must be (d,) or (m, d) with m >= 1, got {array.shape}")
    if array.shape[1] != d:
        raise QueryError(f"embedding dimension {array.shape[1]} does not match the index's {d}")
    return array


def json_queries(body: SearchRequest, settings: Settings, searcher: Searcher) -> np.ndarray:
    """A JSON request's queries as one matrix, after the checks of its shape.

    Embeddings come back float64 (the searcher checks their values before narrowing them);
    gallery ids as their items' own raw float32 vectors (:class:`UnknownIdError`: 404).
    """
    given = [name for name in QUERY_FIELDS if getattr(body, name) is not None]
    if len(given) != 1:
        raise QueryError(
            "send exactly one of 'embedding' (one query), 'embeddings' (a batch), 'id' (a "
            f"gallery item) or 'ids' (a batch of them); got {', '.join(given) or 'none'}"
        )
    if body.id is not None or body.ids is not None:
        ids = [body.id] if body.id is not None else body.ids
        assert ids is not None
        check_batch(ids, "ids", settings.max_batch)
        return searcher.raw_rows([searcher.row_of(i) for i in ids])
    rows = [body.embedding] if body.embedding is not None else body.embeddings
    assert rows is not None
    check_batch(rows, "embeddings", settings.max_batch)
    dims = {len(r) for r in rows}
    if len(dims) != 1:
        raise QueryError(f"embeddings of different lengths {sorted(dims)} in one batch")
    if 0 in dims:
        raise QueryError("empty embedding")
    return np.asarray(rows, dtype=np.float64)


def check_options(body: SearchRequest, settings: Settings) -> None:
    """400 for ``k`` out of range, a non-finite ``min_score``, or ``mode`` "raw" with expansion."""
    if not 1 <= body.k <= settings.max_k:
        raise QueryError(f"k must be between 1 and {settings.max_k}, got {body.k}")
    if body.min_score is not None and not math.isfinite(body.min_score):
        raise QueryError(f"min_score must be a finite number, got {body.min_score}")
    if body.mode == "raw" and body.expand_query and "expand_query" in body.model_fields_set:
        raise QueryError('mode "raw" searches the raw query: expand_query true contradicts it')


def _invalid(exc: ValidationError, where: str) -> RequestValidationError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    return RequestValidationError([{**e, "loc": (where, *e["loc"])} for e in errors])


def check_batch(items: list[Any], field: str, max_batch: int) -> None:
    """A batch field (``embeddings``, ``ids``) holds 1 .. ``max_batch`` items (QueryError otherwise)."""
    if not items:
        raise QueryError(f"'{field}' is empty")
    if len(items) > max_batch:
        raise QueryError(f"batch of {len(items)} is over the limit of {max_batch}")
