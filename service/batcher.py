"""Searches on a few worker threads, concurrent unfiltered ones gathered into one FAISS call.

A FAISS search of 32 queries costs far less than 32 searches of one (one GEMM instead of 32
matrix-vector products). Requests put their (validated) queries on a queue; a few worker
threads each take whatever is waiting, up to ``max_rows`` rows, search it as one batch on the
requests' own searcher (requests on different versions are never mixed), and hand every request
its rows. Nothing waits for a timer: an idle service answers a lone request at once, and requests
that arrive while the workers are busy form the next batch. Filtered searches run on the same
threads, each on its own.

Every worker sets its own OpenMP thread count (``threads``, per thread in OpenMP) before its
first search: FAISS calls from threads that never set it would each start a team as wide as the
machine, and concurrent teams oversubscribe the cores.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from service.searcher import Hit, Searcher

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    searcher: Searcher
    queries: np.ndarray
    k: int
    expand: bool
    filters: dict[str, Any] | None = None
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs searches on ``workers`` threads of ``threads`` OpenMP threads each."""

    def __init__(self, workers: int = 2, max_rows: int = 256, threads: int = 1) -> None:
        self.max_rows, self.threads = max_rows, threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"search-batcher-{i}",
                                          daemon=True) for i in range(workers)]
        self.batches = 0
        self.rows = 0
        for t in self._threads:
            t.start()

    def submit(self, searcher: Searcher, queries: np.ndarray, k: int, expand: bool = True,
               filters: dict[str, Any] | None = None) -> Future:
        """Queue a search; the future resolves to ``searcher.search(queries, k, expand, filters)``.

        The queries are validated here, in the caller's thread, so a bad one fails alone and
        never reaches a batch. ``asyncio.wrap_future`` awaits it from an event loop.
        """
        job = _Job(searcher, searcher.check_queries(queries), k, expand, filters or None)
        self._queue.put(job)
        return job.future

    def search(self, searcher: Searcher, queries: np.ndarray, k: int, expand: bool = True,
               filters: dict[str, Any] | None = None) -> list[list[Hit]]:
        """Like ``searcher.search(queries, k, expand, filters)``, batched with concurrent callers."""
        return self.submit(searcher, queries, k, expand, filters).result()

    def close(self) -> None:
        """Stop the workers (jobs already queued are still answered)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def _run(self) -> None:
        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP setting
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
            groups: dict[tuple[int, bool] | int, list[_Job]] = {}
            # a request whose client went away has cancelled its future: drop it from the batch
            for job in (j for j in jobs if j.future.set_running_or_notify_cancel()):
                key = id(job) if job.filters else (id(job.searcher), job.expand)
                groups.setdefault(key, []).append(job)
            for group in groups.values():
                self._answer(group)
            if stop:
                return

    def _answer(self, group: list[_Job]) -> None:
        first = group[0]
        try:
            batch = np.concatenate([j.queries for j in group])
            hits = first.searcher.search(batch, max(j.k for j in group), first.expand,
                                         first.filters)
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
