"""Request and response bodies of the HTTP API (also what /docs shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FilterCondition = int | float | str | dict[str, Any]


class SearchRequest(BaseModel):
    """One query (``embedding``) or a batch (``embeddings``), exactly one of the two."""

    # examples of the served dimension are added to the OpenAPI document (service.openapi)
    model_config = ConfigDict(extra="forbid")

    embedding: list[float] | None = Field(None, description="one raw query embedding")
    embeddings: list[list[float]] | None = Field(None, description="a batch of raw embeddings")
    k: int = Field(10, description="results per query, 1..AQE_MAX_K")
    expand_query: bool = Field(True, description="expand the query online (AQE) before search")
    filter: dict[str, FilterCondition] | None = Field(
        None,
        description='metadata conditions: {"col": 4}, {"col": {"in"|"not_in": [..]}}, '
        '{"col": {"gte"|"gt"|"lte"|"lt": x}}',
    )
    with_metadata: bool = Field(False, description="include each hit's metadata")


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine of the expanded query and the expanded gallery row")
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
