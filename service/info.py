"""What the service says about itself: the ``/info`` summary and the state its gauges read.

The served version's manifest, the last refused reload and the nightly job's status record
(``artifact.read_status``), with how stale the last successful build is.

Host names, process ids and raw error texts (which can hold paths and internal addresses) are
shown only to a caller that holds the admin token (``private=True``); anyone else gets the
same summary without them.
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


# what /info shows only to admins: where the nightly job ran, and raw error texts
PRIVATE_NIGHTLY_KEYS = ("host", "pid")


def public_nightly(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The nightly summary without its host, pid and failure text."""
    if job is None:
        return None
    out = {k: v for k, v in job.items() if k not in PRIVATE_NIGHTLY_KEYS}
    if out.get("last_failure"):
        out["last_failure"] = {k: v for k, v in out["last_failure"].items() if k != "error"}
    return out


def info_summary(manager: IndexManager, settings: Settings, private: bool = True) -> dict[str, Any]:
    """The body of ``/info``: served version, its manifest summary, reload and nightly state.

    ``private=False`` (a caller without the admin token): no host names, pids or error texts.
    """
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
    job = nightly_summary(settings)
    out["nightly"] = job if private else public_nightly(job)
    f = manager.last_failure
    failure = None if f is None else {"version": f.version, "error": f.error, "at": _utc(f.at)}
    if failure is not None and not private:
        del failure["error"]
    out["last_reload_failure"] = failure
    return out
