"""Request and response bodies of the HTTP API (also what /docs shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FilterCondition = int | float | str | dict[str, Any]


class SearchRequest(BaseModel):
    """One query (``embedding``) or a batch (``embeddings``), exactly one of the two."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"embedding": [0.12, -0.03, 0.54], "k": 5},
                {
                    "embeddings": [[0.12, -0.03, 0.54], [0.2, 0.1, -0.4]],
                    "k": 3,
                    "filter": {"camera": {"not_in": [3]}},
                    "with_metadata": True,
                },
            ]
        },
    )

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
