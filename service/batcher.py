"""Searches on worker threads: concurrent unfiltered ones gathered into one FAISS call, bounded.

A FAISS search of 32 queries costs far less than 32 searches of one (one GEMM instead of 32
matrix-vector products). Requests put their (validated) queries on a queue; ``workers`` threads
each take whatever unfiltered work is waiting, up to ``max_rows`` rows, search it as one batch
per searcher, expansion flag and mode (requests on different versions are never mixed), and hand
each group its rows as soon as that group is searched. Nothing waits for a timer: an idle
service answers a lone request at once, and requests that arrive while the workers are busy
form the next batch.

Filtered searches (whose cost depends on the filter: a long ``in`` list, a selective one that
probes every list) have a queue and ``workers`` threads of their own, one request at a time, so
an expensive filter never holds back unfiltered requests.

Load shedding: each queue holds at most ``max_queue`` requests (:class:`QueueFull` past that),
and a request may carry a deadline: its caller is answered :class:`DeadlineExceeded` when it
passes, and its work, if still queued, is dropped. A request whose caller has gone away (its
future cancelled: the client hung up) is dropped too. Both are :class:`Overloaded`, which the
HTTP layer answers 503 with ``Retry-After``.

Event-loop callers (:meth:`Batcher.submit_async`) get an ``asyncio.Future``; a group wakes each
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
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from aqe_retrieval.searcher import Hit, Searcher

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The service cannot take this search now; the caller may retry after ``retry_after_s``."""

    retry_after_s = 1


class QueueFull(Overloaded):
    """The search queue already holds its ``max_queue`` requests."""


class DeadlineExceeded(Overloaded):
    """The request's deadline passed before its search was answered."""


@dataclass
class _Job:
    searcher: Searcher
    queries: np.ndarray
    k: int
    expand: bool
    filters: dict[str, Any] | None = None
    deadline: float | None = None  # time.monotonic() after which nobody wants the answer
    future: Future | None = None  # a thread's caller (search, submit)
    loop: asyncio.AbstractEventLoop | None = None  # an event loop's caller (submit_async)
    afuture: asyncio.Future | None = None
    raw: bool = False  # plain kNN over the un-expanded gallery (Searcher.search's raw)

    def start(self) -> str | None:
        """Why to skip the job: ``"gone"`` (the caller gave up), ``"late"`` (deadline), or None."""
        late = self.deadline is not None and time.monotonic() > self.deadline
        if self.future is not None:
            if not self.future.set_running_or_notify_cancel():
                return "gone"
            if late:
                self.future.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
            return "late" if late else None
        assert self.afuture is not None
        # read across threads: at worst a wasted search. A late job's caller has been (or is
        # about to be) answered by its timer in the event loop.
        if late:
            return "late"
        return "gone" if self.afuture.cancelled() else "late" if self.afuture.done() else None


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    """In the event loop, at a request's deadline: answer it, if nothing else has."""
    if not future.done():
        future.set_exception(DeadlineExceeded(f"no answer within the {timeout_s:g} s request deadline"))


Outcome = tuple[list[list[Hit]] | None, BaseException | None]


def _settle(items: list[tuple[asyncio.Future, Outcome]]) -> None:
    """In the event loop: hand each waiting request its answer or its error."""
    for fut, (result, error) in items:
        if fut.done():  # cancelled (the client went away) or past its deadline
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class Batcher:
    """Runs searches on ``workers`` threads for unfiltered and ``workers`` for filtered ones.

    Each thread runs ``threads`` OpenMP threads; each queue holds at most ``max_queue`` requests.
    """

    def __init__(
        self,
        workers: int = 2,
        max_rows: int = 256,
        threads: int = 1,
        max_queue: int = 1024,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.max_rows, self.threads, self.max_queue = max_rows, threads, max_queue
        self.on_drop = on_drop  # called with "gone" or "late" for each job dropped unsearched
        self._batched: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._filtered: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run_batches, name=f"search-batcher-{i}", daemon=True)
            for i in range(workers)
        ] + [
            threading.Thread(target=self._run_filtered, name=f"search-filtered-{i}", daemon=True)
            for i in range(workers)
        ]
        self.batches = 0
        self.rows = 0
        for t in self._threads:
            t.start()

    def queued(self) -> int:
        """Requests waiting for a search thread (both queues)."""
        return self._batched.qsize() + self._filtered.qsize()

    def _put(self, job: _Job) -> None:
        # qsize() of a SimpleQueue is exact; submitters racing past the check at once can
        # overshoot the bound by their number, no more (one event loop submits serially)
        q = self._filtered if job.filters else self._batched
        if q.qsize() >= self.max_queue:
            kind = "filtered" if job.filters else "unfiltered"
            raise QueueFull(f"the {kind} search queue is full ({self.max_queue} requests, AQE_MAX_QUEUE)")
        q.put(job)

    def submit(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        raw: bool = False,
    ) -> Future:
        """Queue a search; the future resolves to ``searcher.search(queries, k, expand, filters, raw=raw)``.

        The queries are validated here, in the caller's thread, so a bad one fails alone and
        never reaches a batch. Raises :class:`QueueFull`; a job still queued after ``timeout_s``
        is dropped and its future fails with :class:`DeadlineExceeded`.
        """
        future: Future = Future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        checked = searcher.check_queries(queries)
        self._put(_Job(searcher, checked, k, expand, filters or None, deadline, future=future, raw=raw))
        return future

    def submit_async(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        raw: bool = False,
    ) -> asyncio.Future:
        """Like :meth:`submit`, from a coroutine: await the returned future (cancel to give up).

        With ``timeout_s`` the future fails with :class:`DeadlineExceeded` that many seconds
        from now unless answered before (a timer in the event loop, so a search already running
        on a worker cannot hold the caller past it).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        checked = searcher.check_queries(queries)
        job = _Job(
            searcher, checked, k, expand, filters or None, deadline, loop=loop, afuture=future, raw=raw
        )
        self._put(job)
        if timeout_s is not None:
            timer = loop.call_later(timeout_s, _expire, future, timeout_s)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def search(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
        raw: bool = False,
    ) -> list[list[Hit]]:
        """Like ``searcher.search(queries, k, expand, filters, raw=raw)``, batched with concurrent callers."""
        return self.submit(searcher, queries, k, expand, filters, raw=raw).result()

    def close(self) -> None:
        """Stop the workers (jobs already queued are still answered)."""
        for t in self._threads:
            (self._filtered if t.name.startswith("search-filtered") else self._batched).put(None)
        for t in self._threads:
            t.join(timeout=10)

    def _run_batches(self) -> None:
        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP setting
        while True:
            first = self._batched.get()
            if first is None:
                return
            jobs, rows, stop = [first], len(first.queries), False
            while rows < self.max_rows:
                try:
                    job = self._batched.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                rows += len(job.queries)
            groups: dict[tuple[int, bool, bool], list[_Job]] = {}
            # a request whose client went away, or whose deadline passed, is dropped here
            for job in jobs:
                if self._dropped(job):
                    continue
                groups.setdefault((id(job.searcher), job.expand, job.raw), []).append(job)
            for group in groups.values():  # each group answered as soon as it is searched
                self._deliver(self._answer(group))
            if stop:
                return

    def _run_filtered(self) -> None:
        faiss.omp_set_num_threads(self.threads)
        while True:
            job = self._filtered.get()
            if job is None:
                return
            if not self._dropped(job):
                self._deliver(self._answer([job]))

    def _dropped(self, job: _Job) -> bool:
        why = job.start()
        if why is not None and self.on_drop is not None:
            self.on_drop(why)
        return why is not None

    def _answer(self, group: list[_Job]) -> list[tuple[_Job, Outcome]]:
        first = group[0]
        try:
            batch = np.concatenate([j.queries for j in group])
            # each job's queries were checked when it was submitted
            k = max(j.k for j in group)
            hits = first.searcher.search_checked(batch, k, first.expand, first.filters, raw=first.raw)
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
