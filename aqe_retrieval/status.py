"""The scheduled job's status record: the last run, the last success and failure, staleness.

Pure data; :func:`aqe_retrieval.artifact.write_status` and :func:`~aqe_retrieval.artifact.read_status`
own where it lives. The builder's nightly job writes it, the service reports it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

STATUS_FORMAT_VERSION = 1


class Success(BaseModel):
    time: datetime
    version: str


class Failure(BaseModel):
    time: datetime
    error: str


class NightlyStatus(BaseModel):
    """One index root's nightly record; a run in progress has started > finished."""

    format_version: int = STATUS_FORMAT_VERSION
    host: str
    pid: int
    last_run_started: datetime
    last_run_finished: datetime | None = None
    last_run_ok: bool | None = None
    duration_s: float | None = None
    last_success: Success | None = None
    last_failure: Failure | None = None
    consecutive_failures: int = 0


def staleness_seconds(status: dict[str, Any] | None, now: datetime | float) -> float | None:
    """Seconds from the last successful run to ``now`` (datetime or epoch seconds); None if none."""
    if not status or not status.get("last_success"):
        return None
    if not isinstance(now, datetime):
        now = datetime.fromtimestamp(now, UTC)
    last = datetime.fromisoformat(str(status["last_success"]["time"]).replace("Z", "+00:00"))
    return max(0.0, (now - last).total_seconds())
