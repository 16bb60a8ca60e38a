"""Request and response bodies of the HTTP API (also what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FilterCondition = int | float | str | dict[str, Any]


class SearchRequest(BaseModel):
    """The queries: exactly one of ``embedding``, ``embeddings``, ``id`` or ``ids``."""

    # examples of the served dimension are added to the OpenAPI document (service.openapi)
    model_config = ConfigDict(extra="forbid")

    embedding: list[float] | None = Field(None, description="one raw query embedding")
    embeddings: list[list[float]] | None = Field(None, description="a batch of raw embeddings")
    id: str | None = Field(
        None, description="a gallery item's id: search with that item's own raw vector (404 if unknown)"
    )
    ids: list[str] | None = Field(None, description="a batch of gallery ids, each as `id`")
    k: int = Field(10, description="results per query, 1..AQE_MAX_K")
    mode: Literal["aqe", "raw"] = Field(
        "aqe",
        description='"aqe": search the expanded gallery (the query expanded online unless '
        'expand_query is false); "raw": plain kNN, the raw query over the un-expanded gallery '
        "(level 0) of the same version, for A/B comparisons of AQE",
    )
    expand_query: bool = Field(
        True,
        description='mode "aqe" only: expand the query online before searching the expanded '
        'gallery; false searches the raw query there (mode "raw" never expands)',
    )
    filter: dict[str, FilterCondition] | None = Field(
        None,
        description='metadata conditions: {"col": 4}, {"col": {"in"|"not_in": [..]}}, '
        '{"col": {"gte"|"gt"|"lte"|"lt": x}}',
    )
    min_score: float | None = Field(
        None, description="drop hits scoring below this cosine (so fewer than k may come back)"
    )
    with_metadata: bool = Field(False, description="include each hit's metadata")


class SearchHit(BaseModel):
    id: str
    score: float = Field(
        description='cosine of the expanded query and the expanded gallery row (mode "raw": of '
        "the raw query and the raw gallery row)"
    )
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    index_version: str
    results: list[list[SearchHit]] = Field(description="one list per query, best first")


class ErrorResponse(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[FieldError] = Field(description="where and what, for the first 20 errors")
