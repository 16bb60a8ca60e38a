"""What the service says about itself, without HTTP: the /info summary and the gauges' state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aqe_retrieval import artifact
from aqe_retrieval.status import NightlyStatus, Success
from service.index_manager import IndexManager
from service.info import gauge_state, info_summary, nightly_summary
from service.settings import Settings


def test_before_anything_is_loaded(tmp_path):
    manager, settings = IndexManager(tmp_path), Settings(index_root=tmp_path)
    assert info_summary(manager, settings) == {
        "index_version": None,
        "ready": False,
        "nightly": None,
        "last_reload_failure": None,
    }
    assert gauge_state(manager, settings) == {}


def test_a_served_version_is_summarised_from_its_manifest(built_root):
    manager, settings = IndexManager(built_root), Settings(index_root=built_root)
    assert manager.reload().status == "loaded"
    version = artifact.current_version(built_root)
    manifest = artifact.read_manifest(built_root, version)
    info = info_summary(manager, settings)
    assert info["index_version"] == version and info["ready"] is True
    assert (info["n"], info["d"], info["qe_k"]) == (600, 32, 5)
    assert info["metadata_columns"] == ["camera", "ts", "label"]
    assert info["built_at"] == manifest.created_at.isoformat()
    assert info["loaded_at"].endswith("Z") and info["last_reload_failure"] is None
    state = gauge_state(manager, settings)
    assert state == {"version": version, "n": 600, "created_at": manifest.created_at.timestamp()}


def test_a_refused_version_is_reported_next_to_the_served_one(built_root):
    manager, settings = IndexManager(built_root, max_index_bytes=1), Settings(index_root=built_root)
    assert manager.reload().status == "failed"
    failure = info_summary(manager, settings)["last_reload_failure"]
    assert failure["version"] == artifact.current_version(built_root)
    assert "AQE_MAX_INDEX_BYTES=1" in failure["error"] and failure["at"].endswith("Z")
    assert gauge_state(manager, settings) == {"last_reload_failure_at": manager.last_failure.at}


def test_the_nightly_record_with_its_staleness(tmp_path):
    settings = Settings(index_root=tmp_path, stale_after_s=3600)
    assert nightly_summary(settings) is None
    now = datetime.now(UTC)
    for hours_ago, stale in ((0.5, False), (2, True)):
        ran = now - timedelta(hours=hours_ago)
        record = NightlyStatus(
            host="h", pid=1, last_run_started=ran, last_success=Success(time=ran, version="v1")
        )
        artifact.write_status(tmp_path, record)
        job = nightly_summary(settings)
        assert job is not None and job["stale"] is stale
        assert abs(job["staleness_s"] - hours_ago * 3600) < 60
        state = gauge_state(IndexManager(tmp_path), settings)
        assert state["nightly_consecutive_failures"] == 0
        assert abs(state["nightly_staleness_seconds"] - hours_ago * 3600) < 60


def test_a_job_that_never_succeeded_is_stale(tmp_path):
    settings = Settings(index_root=tmp_path)
    started = datetime.now(UTC)
    artifact.write_status(
        tmp_path, NightlyStatus(host="h", pid=1, last_run_started=started, consecutive_failures=3)
    )
    job = nightly_summary(settings)
    assert job is not None and job["staleness_s"] is None and job["stale"] is True
    assert gauge_state(IndexManager(tmp_path), settings) == {
        "nightly_staleness_seconds": None,
        "nightly_consecutive_failures": 3,
    }
