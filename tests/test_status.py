"""The nightly status record: its model and how stale the last success is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from aqe_retrieval.status import STATUS_FORMAT_VERSION, Failure, NightlyStatus, Success, staleness_seconds

T = datetime(2025, 1, 2, 3, 0, tzinfo=UTC)


def test_staleness_seconds() -> None:
    t = datetime(2025, 1, 2, 3, 0, tzinfo=UTC)
    record = {"last_success": {"time": t.isoformat(), "version": "v"}}
    assert staleness_seconds(record, t + timedelta(hours=1)) == 3600.0
    assert staleness_seconds(record, (t + timedelta(seconds=5)).timestamp()) == 5.0
    assert staleness_seconds({"last_success": None}, t) is None
    assert staleness_seconds(None, t) is None


def test_staleness_reads_a_z_suffix_and_other_time_zones() -> None:
    zulu = {"last_success": {"time": "2025-01-02T03:00:00Z", "version": "v"}}
    assert staleness_seconds(zulu, T + timedelta(minutes=2)) == 120.0
    plus_two = {"last_success": {"time": "2025-01-02T05:00:00+02:00", "version": "v"}}
    assert staleness_seconds(plus_two, T + timedelta(seconds=30)) == 30.0


def test_staleness_of_a_success_in_the_future_is_zero_not_negative() -> None:
    record = {"last_success": {"time": (T + timedelta(hours=1)).isoformat(), "version": "v"}}
    assert staleness_seconds(record, T) == 0.0
    assert staleness_seconds(record, T.timestamp()) == 0.0


def test_staleness_of_a_record_without_any_success() -> None:
    assert staleness_seconds({}, T) is None
    record = NightlyStatus(host="h", pid=1, last_run_started=T, consecutive_failures=3)
    assert staleness_seconds(record.model_dump(mode="json"), T) is None


def test_staleness_of_a_dumped_record_round_trips() -> None:
    record = NightlyStatus(
        host="h",
        pid=1,
        last_run_started=T,
        last_run_finished=T + timedelta(minutes=5),
        last_run_ok=True,
        duration_s=300.0,
        last_success=Success(time=T + timedelta(minutes=5), version="v1"),
    )
    dumped = record.model_dump(mode="json")
    assert NightlyStatus.model_validate(dumped) == record
    assert staleness_seconds(dumped, T + timedelta(minutes=65)) == 3600.0


def test_status_model_defaults_and_validation() -> None:
    record = NightlyStatus(host="h", pid=7, last_run_started=T)
    assert record.format_version == STATUS_FORMAT_VERSION == 1
    assert (record.last_run_finished, record.last_run_ok, record.last_success) == (None, None, None)
    assert record.consecutive_failures == 0 and record.last_failure is None
    assert Failure(time=T, error="RuntimeError: x").error == "RuntimeError: x"
    with pytest.raises(ValidationError, match="pid"):
        NightlyStatus.model_validate({"host": "h", "pid": "not a pid", "last_run_started": T})
