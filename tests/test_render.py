"""Answers on the wire: search results, and the error table applied to refused queries."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.exceptions import RequestValidationError

from aqe_retrieval.errors import ArtifactError, FilterError, QueryError
from aqe_retrieval.searcher import Hit
from service import render


class FakeSearcher:
    version = "v7"

    def external_id(self, row: int) -> str:
        return f"id-{row}"

    def metadata(self, row: int) -> dict:
        return {"row": row}


def hits(rows: int, per_row: int) -> list[list[Hit]]:
    return [[Hit(row=i * per_row + j, score=1.0 - j / 10) for j in range(per_row)] for i in range(rows)]


def test_hits_as_ids_and_scores_with_metadata_on_request():
    plain = json.loads(render.render_hits(FakeSearcher(), hits(2, 2), False).body)
    assert plain == {
        "index_version": "v7",
        "results": [
            [{"id": "id-0", "score": 1.0}, {"id": "id-1", "score": 0.9}],
            [{"id": "id-2", "score": 1.0}, {"id": "id-3", "score": 0.9}],
        ],
    }
    rich = json.loads(render.render_hits(FakeSearcher(), hits(1, 1), True).body)
    assert rich["results"] == [[{"id": "id-0", "score": 1.0, "metadata": {"row": 0}}]]


@pytest.mark.parametrize("n", [render.RENDER_INLINE_HITS, render.RENDER_INLINE_HITS + 1])
def test_large_answers_render_the_same_off_the_event_loop(n):
    answer = asyncio.run(render.search_response(FakeSearcher(), hits(1, n), False))
    assert answer.body == render.render_hits(FakeSearcher(), hits(1, n), False).body


@pytest.mark.parametrize(
    ("error", "status"),
    [(QueryError("bad k"), 400), (FilterError("bad column"), 400), (ArtifactError("gone"), 503)],
)
def test_domain_errors_are_answered_at_their_status_in_the_table(error, status):
    response = asyncio.run(render.domain_error(None, error))
    assert response.status_code == status and json.loads(response.body) == {"detail": str(error)}


def test_validation_errors_are_bounded_and_never_echo_the_input():
    errors = [
        {"loc": ("body", "embedding", i), "msg": "bad", "type": "float_parsing", "input": "x"}
        for i in range(25)
    ]
    response = asyncio.run(render.invalid_body(None, RequestValidationError(errors)))
    detail = json.loads(response.body)["detail"]
    assert response.status_code == 422 and len(detail) == render.MAX_VALIDATION_ERRORS + 1
    assert detail[0] == {"loc": ["body", "embedding", 0], "msg": "bad", "type": "float_parsing"}
    assert detail[-1] == {"loc": ["body"], "msg": "and 5 more errors", "type": "too_many_errors"}
