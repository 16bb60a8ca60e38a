"""Searches on a few worker threads, concurrent unfiltered ones gathered into one FAISS call.

A FAISS search of 32 queries costs far less than 32 searches of one (one GEMM instead of 32
matrix-vector products). Requests put their (validated) queries on a queue; a few worker
threads each take whatever is waiting, up to ``max_rows`` rows, search it as one batch on the
requests' own searcher (requests on different versions are never mixed), and hand every request
its rows. Nothing waits for a timer: an idle service answers a lone request at once, and requests
that arrive while the workers are busy form the next batch. Filtered searches run on the same
threads, each on its own.

Event-loop callers (:meth:`Batcher.submit_async`) get an ``asyncio.Future``; a batch wakes each
loop once for all of its answers (one ``call_soon_threadsafe``), not once per request.

Every worker sets its own OpenMP thread count (``threads``, per thread in OpenMP) before its
first search: FAISS calls from threads that never set it would each start a team as wide as the
machine, and concurrent teams oversubscribe the cores.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from aqe_retrieval.searcher import Hit, Searcher

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    searcher: Searcher
    queries: np.ndarray
    k: int
    expand: bool
    filters: dict[str, Any] | None = None
    future: Future | None = None  # a thread's caller (search, submit)
    loop: asyncio.AbstractEventLoop | None = None  # an event loop's caller (submit_async)
    afuture: asyncio.Future | None = None

    def start(self) -> bool:
        """False if the caller has gone away (its future cancelled): then skip the job."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        assert self.afuture is not None
        return not self.afuture.cancelled()  # read across threads: at worst a wasted search


Outcome = tuple[list[list[Hit]] | None, BaseException | None]


def _settle(items: list[tuple[asyncio.Future, Outcome]]) -> None:
    """In the event loop: hand each waiting request its answer or its error."""
    for fut, (result, error) in items:
        if fut.cancelled():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class Batcher:
    """Runs searches on ``workers`` threads of ``threads`` OpenMP threads each."""

    def __init__(self, workers: int = 2, max_rows: int = 256, threads: int = 1) -> None:
        self.max_rows, self.threads = max_rows, threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"search-batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        self.batches = 0
        self.rows = 0
        for t in self._threads:
            t.start()

    def submit(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
    ) -> Future:
        """Queue a search; the future resolves to ``searcher.search(queries, k, expand, filters)``.

        The queries are validated here, in the caller's thread, so a bad one fails alone and
        never reaches a batch.
        """
        future: Future = Future()
        self._queue.put(
            _Job(searcher, searcher.check_queries(queries), k, expand, filters or None, future=future)
        )
        return future

    def submit_async(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
    ) -> asyncio.Future:
        """Like :meth:`submit`, from a coroutine: await the returned future (cancel to give up)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(
            _Job(
                searcher,
                searcher.check_queries(queries),
                k,
                expand,
                filters or None,
                loop=loop,
                afuture=future,
            )
        )
        return future

    def search(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
    ) -> list[list[Hit]]:
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
            for job in (j for j in jobs if j.start()):
                key = id(job) if job.filters else (id(job.searcher), job.expand)
                groups.setdefault(key, []).append(job)
            outcomes = [pair for group in groups.values() for pair in self._answer(group)]
            self._deliver(outcomes)
            if stop:
                return

    def _answer(self, group: list[_Job]) -> list[tuple[_Job, Outcome]]:
        first = group[0]
        try:
            batch = np.concatenate([j.queries for j in group])
            # each job's queries were checked when it was submitted
            hits = first.searcher.search_checked(batch, max(j.k for j in group), first.expand, first.filters)
        except Exception as exc:  # the failure goes to every request of the group
            return [(j, (None, exc)) for j in group]
        self.batches += 1
        self.rows += len(batch)
        out: list[tuple[_Job, Outcome]] = []
        start = 0
        for j in group:
            out.append((j, ([row[: j.k] for row in hits[start : start + len(j.queries)]], None)))
            start += len(j.queries)
        return out

    @staticmethod
    def _deliver(outcomes: list[tuple[_Job, Outcome]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Outcome]]] = {}
        for job, (result, error) in outcomes:
            if job.future is not None:
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
            elif job.loop is not None and job.afuture is not None:
                by_loop.setdefault(job.loop, []).append((job.afuture, (result, error)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting
                logger.debug("dropped %d answers for a closed event loop", len(items))
