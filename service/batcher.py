"""Concurrent searches gathered into one FAISS call.

A FAISS search of 32 queries costs far less than 32 searches of one (one GEMM instead of 32
matrix-vector products). Request threads put their (validated) queries on a queue; a few worker
threads each take whatever is waiting, up to ``max_rows`` rows, search it as one batch on the
requests' own searcher (requests on different versions are never mixed), and hand every request
its rows. Nothing waits for a timer: an idle service answers a lone request at once, and requests
that arrive while the workers are busy form the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from service.searcher import Hit, Searcher

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    searcher: Searcher
    queries: np.ndarray
    k: int
    expand: bool
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs unfiltered searches in batches on ``workers`` threads."""

    def __init__(self, workers: int = 2, max_rows: int = 256) -> None:
        self.max_rows = max_rows
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"search-batcher-{i}",
                                          daemon=True) for i in range(workers)]
        self.batches = 0
        self.rows = 0
        for t in self._threads:
            t.start()

    def search(self, searcher: Searcher, queries: np.ndarray, k: int,
               expand: bool = True) -> list[list[Hit]]:
        """Like ``searcher.search(queries, k, expand)``, batched with concurrent callers."""
        job = _Job(searcher, searcher.check_queries(queries), k, expand)
        self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """Stop the workers (jobs already queued are still answered)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, rows, stop = [first], len(first.queries), False
            while rows < self.max_rows:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                rows += len(job.queries)
            groups: dict[tuple[int, bool], list[_Job]] = {}
            for job in jobs:
                groups.setdefault((id(job.searcher), job.expand), []).append(job)
            for group in groups.values():
                self._answer(group)
            if stop:
                return

    def _answer(self, group: list[_Job]) -> None:
        try:
            batch = np.concatenate([j.queries for j in group])
            hits = group[0].searcher.search(batch, max(j.k for j in group), group[0].expand)
        except Exception as exc:  # hand the failure to every waiting request
            for j in group:
                j.future.set_exception(exc)
            return
        self.batches += 1
        self.rows += len(batch)
        start = 0
        for j in group:
            j.future.set_result([row[: j.k] for row in hits[start : start + len(j.queries)]])
            start += len(j.queries)
