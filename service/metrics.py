"""Prometheus metrics of one app instance (its own registry, so tests and apps never collide).

With several worker processes (``AQE_WORKERS > 1``) every worker writes its counters,
histograms and gauges to files in one directory (prometheus-client's multiprocess mode,
``PROMETHEUS_MULTIPROC_DIR``, made by ``search-service`` for the run), and ``/metrics`` in any
worker reads them all: one view of the whole server, whichever worker answers the scrape.
Counters and histograms are summed over the workers; ``aqe_workers_serving{version}`` counts
the live workers serving each version. The scrape-time gauges of :class:`_StateCollector`
(the answering worker's served version, the nightly job's state on disk) are added to it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.index_manager import ReloadOutcome

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Request counters and latencies, queries per request, reloads, the served version."""

    def __init__(self, state: Callable[[], dict[str, Any]], multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        # the registry /metrics exposes; in multiprocess mode the metrics live in files, which
        # the MultiProcessCollector reads, and are registered nowhere else
        self.registry = CollectorRegistry()
        own: CollectorRegistry | None = self.registry
        if multiprocess_dir is not None:
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
            own = None
        self.requests = Counter("aqe_requests_total", "HTTP requests", ["route", "status"], registry=own)
        self.latency = Histogram(
            "aqe_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.queries = Histogram(
            "aqe_queries_per_request",
            "query embeddings per search request",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            registry=own,
        )
        self.reloads = Counter(
            "aqe_reloads_total", "index versions loaded (summed over workers)", registry=own
        )
        self.reload_failures = Counter("aqe_reload_failures_total", "index versions refused", registry=own)
        self.dropped = Counter(
            "aqe_searches_dropped_total",
            "searches dropped before they ran: client gone, or deadline passed",
            ["reason"],
            registry=own,
        )
        self.serving = Gauge(
            "aqe_workers_serving",
            "live worker processes serving each index version",
            ["version"],
            registry=own,
            multiprocess_mode="livesum",
        )
        self._served: str | None = None
        self.registry.register(_StateCollector(state))

    def count_drop(self, reason: str) -> None:
        """Count a queued search dropped unsearched (``Batcher(on_drop=...)``)."""
        self.dropped.labels(reason).inc()

    def count_reload(self, outcome: ReloadOutcome) -> None:
        """Count a reload that loaded a version or refused one (``IndexManager.subscribe``)."""
        if outcome.status == "loaded":
            self.reloads.inc()
            if self._served is not None:
                self.serving.labels(self._served).set(0)
            self._served = outcome.version
            self.serving.labels(str(outcome.version)).set(1)
        elif outcome.status == "failed":
            self.reload_failures.inc()

    def close(self) -> None:
        """At worker exit: drop this process's live gauges from the multiprocess view."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), str(self.multiprocess_dir))


class _StateCollector:
    """Gauges read at scrape time: served version, its age, rows, readiness, nightly staleness."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        """The gauges of the state as it is now (called at every scrape)."""
        s = self.state()
        ready = GaugeMetricFamily("aqe_ready", "1 when a version is loaded and warmed up")
        ready.add_metric([], 1.0 if s.get("version") else 0.0)
        yield ready
        if s.get("version"):
            info = GaugeMetricFamily("aqe_index_info", "the served index version", labels=["version"])
            info.add_metric([s["version"]], 1.0)
            yield info
            age = GaugeMetricFamily("aqe_index_age_seconds", "seconds since the served version was built")
            age.add_metric([], time.time() - s["created_at"])
            yield age
            rows = GaugeMetricFamily("aqe_index_rows", "gallery rows in the served version")
            rows.add_metric([], float(s["n"]))
            yield rows
        if s.get("last_reload_failure_at") is not None:
            fail = GaugeMetricFamily(
                "aqe_last_reload_failure_timestamp_seconds", "when a version was last refused"
            )
            fail.add_metric([], s["last_reload_failure_at"])
            yield fail
        for name, help_text in (
            ("nightly_staleness_seconds", "seconds since the nightly job last succeeded"),
            ("nightly_consecutive_failures", "nightly runs failed in a row"),
        ):
            if s.get(name) is not None:
                g = GaugeMetricFamily(f"aqe_{name}", help_text)
                g.add_metric([], float(s[name]))
                yield g
