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

An idle batcher answers a lone small search inline (:meth:`Batcher.search_async`): on the event
loop's own thread, with no hand-off to a worker and back. Each hand-off wakes a sleeping thread
(measured in process at 200,000 x 256 on the 2 shared cores, load average 9: a median of 0.97 ms
for a search inline against 1.68 ms through a worker). Only a search that is cheap enough to
hold the loop for is inlined: unfiltered, at most :data:`INLINE_MAX_ROWS` queries, estimated at
most :data:`INLINE_MAX_S` (its rows times the measured cost per row of its kind: version,
expansion flag, mode); the first search of each kind runs on a worker and is timed there.

On-loop batching (``on_loop``, the service's ``AQE_SEARCH_ON_LOOP``): when each core has a
worker process of its own, cheap unfiltered searches are not handed to the threads at all. Each
request puts its job on its event loop's pending list, and the first one of a turn schedules one
callback (``call_soon``) that runs after every request the loop read in that turn has done so:
it searches them grouped by kind, as the workers would, on the loop's own thread, and answers
them. No thread is woken and no thread waits for another's GIL. A turn searches for at most
about :data:`LOOP_BUDGET_S` (estimated from each kind's measured cost per row) before the loop
reads its sockets again; the rest waits for the next turn. A search estimated over
:data:`LOOP_MAX_S`, a filtered one, and the first of each kind (untimed) still go to the threads.
Measured (``benchmarks/ab_http.py``, 200,000 x 256 HNSW, two worker processes on the two cores,
their connections balanced): 1.07x the q/s of the threads at 32 connections with p99 29 against
43 ms, 1.11x at 8; with one worker process for both cores 0.82x (one thread cannot use two cores),
hence on by default only with a worker per core.

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
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from aqe_retrieval.searcher import Hit, Searcher

logger = logging.getLogger(__name__)

INLINE_MAX_ROWS = 4
"""Searches of up to this many queries may run inline on an idle batcher's caller."""
INLINE_MAX_S = 0.002
"""... when their kind's measured cost per row times their rows is at most this long (an exact
scan of a large gallery, tens of ms a query, always goes to a worker: the loop would stall)."""
LOOP_MAX_S = 0.002
"""On-loop batching (``on_loop``): a request whose search is estimated (its rows times its kind's
measured seconds per row) at most this long is searched on its event loop's thread."""
LOOP_BUDGET_S = 0.008
"""... and one turn of the loop searches for at most about this long before the loop reads its
sockets again (the rest of what is pending goes in the next turn)."""


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
        on_loop: bool = False,
    ) -> None:
        self.max_rows, self.threads, self.max_queue = max_rows, threads, max_queue
        self.on_loop = on_loop
        # per event loop: cheap searches waiting for its next turn (on_loop)
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self.on_drop = on_drop  # called with "gone" or "late" for each job dropped unsearched
        self._batched: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._filtered: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run_batches, args=(i,), name=f"search-batcher-{i}", daemon=True)
            for i in range(workers)
        ] + [
            threading.Thread(target=self._run_filtered, name=f"search-filtered-{i}", daemon=True)
            for i in range(workers)
        ]
        self.batches = 0
        self.rows = 0
        self.inline = 0  # searches answered on their caller's (event loop's) thread
        # per worker: whether it holds a batch (each slot written by its own thread only)
        self._working = [False] * workers
        # per version and kind (expansion flag, mode): estimated seconds per row (_measured)
        self._cost: weakref.WeakKeyDictionary[Searcher, dict[tuple[bool, bool], float]] = (
            weakref.WeakKeyDictionary()
        )
        self._inline_claimed = False  # a caller is deciding whether to search inline
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
        self._put(self._job(searcher, queries, k, expand, filters, timeout_s, raw, future=future))
        return future

    @staticmethod
    def _job(
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool,
        filters: dict[str, Any] | None,
        timeout_s: float | None,
        raw: bool,
        *,
        checked: bool = False,
        **caller: Any,
    ) -> _Job:
        """A job for one caller (``future=``, or ``loop=`` and ``afuture=``), its queries checked once."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        rows = queries if checked else searcher.check_queries(queries)
        return _Job(searcher, rows, k, expand, filters or None, deadline, raw=raw, **caller)

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
        return self._submit_async(searcher, queries, k, expand, filters, timeout_s, raw)

    def _submit_async(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool,
        filters: dict[str, Any] | None,
        timeout_s: float | None,
        raw: bool,
        checked: bool = False,
    ) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = self._job(
            searcher, queries, k, expand, filters, timeout_s, raw, checked=checked, loop=loop, afuture=future
        )
        self._put(job)
        if timeout_s is not None:
            timer = loop.call_later(timeout_s, _expire, future, timeout_s)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    async def search_async(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        raw: bool = False,
    ) -> list[list[Hit]]:
        """:meth:`submit_async` awaited, or the search run on the caller's event loop thread.

        With ``on_loop``: every unfiltered search estimated at most :data:`LOOP_MAX_S` (its
        rows times its kind's measured cost per row) is batched with the others of this turn of
        the loop (:meth:`_flush`). Without: inline when the batcher is idle, for an unfiltered
        search of at most :data:`INLINE_MAX_ROWS` queries estimated at most
        :data:`INLINE_MAX_S`, with nothing queued or being searched; the caller first yields
        to the event loop once, so requests that arrived with it reach the queue before it
        decides (they then batch on the workers, and so does it). Raises what
        :meth:`submit_async` would.
        """
        estimate = None if filters else self._estimate(searcher, expand, raw, len(queries))
        if self.on_loop and estimate is not None and estimate <= LOOP_MAX_S:
            return await self._on_loop(searcher, queries, k, expand, timeout_s, raw)
        if filters or len(queries) > INLINE_MAX_ROWS or self._inline_claimed:
            return await self.submit_async(searcher, queries, k, expand, filters, timeout_s, raw)
        if estimate is None or estimate > INLINE_MAX_S or not self._idle():
            return await self.submit_async(searcher, queries, k, expand, filters, timeout_s, raw)
        checked = searcher.check_queries(queries)
        self._inline_claimed = True
        try:
            await asyncio.sleep(0)  # the requests that arrived with this one run up to here
            inline = self._idle()
        except asyncio.CancelledError:  # the caller went away first: dropped unsearched
            if self.on_drop is not None:
                self.on_drop("gone")
            raise
        finally:
            self._inline_claimed = False
        if not inline:
            return await self._submit_async(searcher, checked, k, expand, None, timeout_s, raw, True)
        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP setting, as a worker's
        t0 = time.perf_counter()
        hits = searcher.search_checked(checked, k, expand, raw=raw)
        self._measured(searcher, expand, raw, len(checked), time.perf_counter() - t0)
        self.inline += 1
        self.batches += 1
        self.rows += len(checked)
        return hits

    async def _on_loop(
        self,
        searcher: Searcher,
        queries: np.ndarray,
        k: int,
        expand: bool,
        timeout_s: float | None,
        raw: bool,
    ) -> list[list[Hit]]:
        """The search, with the others of this turn of the loop, on the loop's thread (:meth:`_flush`).

        The first request of a turn leads it: it yields to the loop once, so the requests read
        in the same turn join it, then searches them all and answers them (measured with the
        search stubbed out, in process: 200 us a request when a callback searched the turn
        and the first request waited for its future too, 163 us inline). No timer: the
        deadline is checked when the turn's searches start (within the turn, or in the next
        ones when a turn's budget ran out).
        """
        loop = asyncio.get_running_loop()
        pending = self._pending.get(loop)
        if pending is not None:  # this turn has a leader (or a callback) that will search it
            future = loop.create_future()
            pending.append(
                self._job(searcher, queries, k, expand, None, timeout_s, raw, loop=loop, afuture=future)
            )
            return await future
        own = self._job(searcher, queries, k, expand, None, timeout_s, raw)
        self._pending[loop] = []
        try:
            await asyncio.sleep(0)  # the requests that arrived with this one join the turn
        except asyncio.CancelledError:  # gone before searching: the others go to a callback
            if self._pending.get(loop):
                loop.call_soon(self._flush, loop)
            else:
                self._pending.pop(loop, None)
            if self.on_drop is not None:
                self.on_drop("gone")
            raise
        result, error = self._flush(loop, own)
        if error is not None:
            raise error
        assert result is not None
        return result

    def _flush(self, loop: asyncio.AbstractEventLoop, own: _Job | None = None) -> Outcome:
        """In the loop: this turn's pending searches (``own`` first), grouped by kind, searched.

        Each waiting caller is answered; ``own``'s outcome (the leader's) is returned. Callers
        that went away, or whose deadline passed, are dropped first (and counted). Past
        :data:`LOOP_BUDGET_S` of estimated search, or ``max_rows`` rows, the rest is left for
        the next turn.
        """
        jobs = self._pending.pop(loop)
        if own is not None:
            jobs.insert(0, own)
        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP setting, as a worker's
        groups: dict[tuple[int, bool, bool], list[_Job]] = {}
        spent, rows = 0.0, 0
        for at, job in enumerate(jobs):
            why = None if job is own else job.start()
            if why is not None:
                if why == "late" and job.afuture is not None and not job.afuture.done():
                    job.afuture.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
                if self.on_drop is not None:
                    self.on_drop(why)
                continue
            if spent >= LOOP_BUDGET_S or rows >= self.max_rows:  # the loop reads its sockets first
                self._pending[loop] = jobs[at:]  # and the rest is searched in the next turn
                loop.call_soon(self._flush, loop)
                break
            spent += self._estimate(job.searcher, job.expand, job.raw, len(job.queries)) or 0.0
            rows += len(job.queries)
            groups.setdefault((id(job.searcher), job.expand, job.raw), []).append(job)
        mine: Outcome = (None, None)
        for group in groups.values():
            outcomes = self._answer(group)
            self.inline += len(group)
            _settle([(j.afuture, outcome) for j, outcome in outcomes if j.afuture is not None])
            mine = next((outcome for j, outcome in outcomes if j is own), mine)
        return mine

    def _idle(self) -> bool:
        return not any(self._working) and self._batched.qsize() == 0

    def _estimate(self, searcher: Searcher, expand: bool, raw: bool, rows: int) -> float | None:
        """Estimated seconds of a search of ``rows`` rows of this kind (None: not timed yet)."""
        per_row = self._cost.get(searcher, {}).get((expand, raw))
        return None if per_row is None else per_row * rows

    def _measured(self, searcher: Searcher, expand: bool, raw: bool, rows: int, seconds: float) -> None:
        """Record a search's seconds per row as its kind's estimated cost per row.

        A search of up to :data:`INLINE_MAX_ROWS` rows sets it; a larger batch, whose cost per
        row flatters a single query's (one GEMM for an exact scan), may only raise it.
        """
        per_row = seconds / max(rows, 1)
        costs = self._cost.setdefault(searcher, {})
        if rows <= INLINE_MAX_ROWS or per_row > costs.get((expand, raw), 0.0):
            costs[(expand, raw)] = per_row

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

    def _run_batches(self, slot: int) -> None:
        faiss.omp_set_num_threads(self.threads)  # this thread's OpenMP setting
        while True:
            first = self._batched.get()
            if first is None:
                return
            self._working[slot] = True
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
            last = len(groups) - 1
            for i, group in enumerate(groups.values()):  # each answered as soon as it is searched
                outcomes = self._answer(group)
                if i == last:  # idle from here on: a caller woken by this answer may go inline
                    self._working[slot] = False
                self._deliver(outcomes)
            self._working[slot] = False
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
            t0 = time.perf_counter()
            hits = first.searcher.search_checked(batch, k, first.expand, first.filters, raw=first.raw)
            if not first.filters:
                self._measured(first.searcher, first.expand, first.raw, len(batch), time.perf_counter() - t0)
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
