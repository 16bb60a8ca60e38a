"""What the service says about itself: the ``/info`` summary and the state its gauges read.

The served version's manifest, the last refused reload and the nightly job's status record
(``artifact.read_status``), with how stale the last successful build is.
"""

from __future__ import annotations

import time
from typing import Any

from aqe_retrieval import artifact
from aqe_retrieval.status import staleness_seconds
from service.index_manager import IndexManager
from service.settings import Settings


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def nightly_summary(settings: Settings) -> dict[str, Any] | None:
    """The nightly job's status record with its staleness; None if the job never ran."""
    record = artifact.read_status(settings.index_root)
    if record is None:
        return None
    age = staleness_seconds(record, time.time())
    return {**record, "staleness_s": age, "stale": age is None or age > settings.stale_after_s}


def gauge_state(manager: IndexManager, settings: Settings) -> dict[str, Any]:
    """The figures :class:`~service.metrics.Metrics` exposes as gauges, read at scrape time."""
    s = manager.searcher
    state: dict[str, Any] = {}
    job = nightly_summary(settings)
    if job is not None:
        state["nightly_staleness_seconds"] = job["staleness_s"]
        state["nightly_consecutive_failures"] = job["consecutive_failures"]
    if s is not None:
        state.update(version=s.version, n=s.n, created_at=s.manifest.created_at.timestamp())
    if manager.last_failure is not None:
        state["last_reload_failure_at"] = manager.last_failure.at
    return state


def info_summary(manager: IndexManager, settings: Settings) -> dict[str, Any]:
    """The body of ``/info``: served version, its manifest summary, reload and nightly state."""
    s = manager.searcher
    out: dict[str, Any] = {"index_version": s.version if s else None, "ready": s is not None}
    if s is not None:
        m = s.manifest
        out.update(
            n=m.n,
            d=m.d,
            qe_k=m.qe_k,
            effective_qe_k=m.effective_qe_k,
            alpha=m.alpha,
            qe_times=m.qe_times,
            knn=m.knn,
            graph_recall=m.graph_recall,
            serving_index=m.serving_index.model_dump(),
            metadata_columns=[c.name for c in m.metadata],
            built_at=m.created_at.isoformat(),
            loaded_at=_utc(s.loaded_at),
            quality=m.quality,
        )
    out["nightly"] = nightly_summary(settings)
    f = manager.last_failure
    out["last_reload_failure"] = (
        None if f is None else {"version": f.version, "error": f.error, "at": _utc(f.at)}
    )
    return out
