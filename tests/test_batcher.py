"""Batched search returns exactly what each request would get alone."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from aqe_retrieval import artifact
from aqe_retrieval.errors import QueryError
from aqe_retrieval.searcher import Searcher
from service.batcher import Batcher, DeadlineExceeded, QueueFull


@pytest.fixture(scope="module")
def searcher(built_root):
    return Searcher(artifact.load(built_root))


def test_concurrent_requests_get_their_own_answers(searcher, small_gallery):
    x, _ = small_gallery
    batcher = Batcher(workers=2, max_rows=16)
    rng = np.random.default_rng(0)
    jobs = [
        (
            x[rng.integers(len(x), size=rng.integers(1, 4))] + 0.01,
            int(rng.integers(1, 12)),
            bool(rng.integers(2)),
        )
        for _ in range(200)
    ]
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda j: batcher.search(searcher, *j), jobs))
    finally:
        batcher.close()
    for (q, k, expand), hits in zip(jobs, got, strict=True):
        want = searcher.search(q, k, expand)
        for mine, theirs in zip(hits, want, strict=True):
            assert len(mine) == len(theirs) == k
            np.testing.assert_allclose([h.score for h in mine], [h.score for h in theirs], atol=1e-5)
            # the same rows, except inside a tie at the k-th score (exact duplicates: batch
            # and single searches may order a tie differently)
            cut = theirs[-1].score + 1e-5
            assert {h.row for h in mine if h.score > cut} == {h.row for h in theirs if h.score > cut}
    assert batcher.rows >= 200 and batcher.batches <= len(jobs)


def test_versions_are_never_mixed_and_errors_reach_the_caller(built_root, searcher, small_gallery):
    x, _ = small_gallery
    # two loaded version objects that record the query rows each is asked to search
    versions = [_Recording(searcher), _Recording(Searcher(artifact.load(built_root)))]
    batcher = Batcher(workers=1)
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: batcher.search(versions[i % 2], x[i : i + 1], 3), range(40)))
        for parity, version in enumerate(versions):
            seen = np.concatenate(version.seen)
            assert sorted(seen.tolist()) == sorted(x[parity:40:2].tolist()), "a batch mixed two versions"
        for i, hits in enumerate(got):
            assert [h.row for h in hits[0]] == [h.row for h in searcher.search(x[i : i + 1], 3)[0]]
        with pytest.raises(QueryError, match="dimension"):
            batcher.search(searcher, np.ones((1, 5), np.float32), 3)
    finally:
        batcher.close()


def test_a_cancelled_request_is_dropped_and_the_workers_go_on(searcher, small_gallery):
    """A client that goes away cancels its future; the batch it was in still answers the rest."""
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    gate = threading.Event()
    try:
        # hold the only worker inside a search so the next jobs wait in the queue
        slow = batcher.submit(_Blocking(searcher, gate), x[:1], 3)
        gone = batcher.submit(searcher, x[1:2], 3)
        kept = batcher.submit(searcher, x[2:3], 3)
        assert gone.cancel()
        gate.set()
        assert len(slow.result(timeout=10)[0]) == 3
        assert [h.row for h in kept.result(timeout=10)[0]] == [h.row for h in searcher.search(x[2:3], 3)[0]]
        assert gone.cancelled()
        # the worker survived: a later request is answered
        assert len(batcher.search(searcher, x[3:4], 2)[0]) == 2
    finally:
        gate.set()
        batcher.close()


class _Blocking:
    """A searcher stand-in whose search waits for ``gate`` (for queueing jobs behind it)."""

    def __init__(self, searcher: Searcher, gate: threading.Event) -> None:
        self.searcher, self.gate = searcher, gate

    def check_queries(self, queries):
        return self.searcher.check_queries(queries)

    def search_checked(self, queries, k, expand=True, filters=None, raw=False):
        assert self.gate.wait(10)
        return self.searcher.search_checked(queries, k, expand, filters, raw=raw)


class _Recording:
    """A searcher stand-in that remembers every batch of query rows it searched."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher, self.seen = searcher, []

    def check_queries(self, queries):
        return self.searcher.check_queries(queries)

    def search_checked(self, queries, k, expand=True, filters=None, raw=False):
        self.seen.append(np.array(queries))
        return self.searcher.search_checked(queries, k, expand, filters, raw=raw)


def test_searches_run_with_the_configured_openmp_threads(searcher, small_gallery):
    """OpenMP settings are per thread: each worker sets its own, or FAISS teams oversubscribe."""
    x, _ = small_gallery
    seen: list[int] = []

    class Recording(_Blocking):
        def search_checked(self, queries, k, expand=True, filters=None, raw=False):
            seen.append(faiss.omp_get_max_threads())
            return self.searcher.search_checked(queries, k, expand, filters, raw=raw)

    batcher = Batcher(workers=2, threads=3)
    try:
        for i in range(4):
            batcher.search(Recording(searcher, threading.Event()), x[i : i + 1], 2)
    finally:
        batcher.close()
    assert seen == [3, 3, 3, 3]


def test_filtered_searches_run_alone_on_the_workers(searcher, small_gallery):
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    try:
        got = batcher.search(searcher, x[:2], 4, filters={"camera": {"not_in": [0]}})
    finally:
        batcher.close()
    assert got == searcher.search(x[:2], 4, filters={"camera": {"not_in": [0]}})


def test_event_loop_callers_get_their_answers_and_may_give_up(searcher, small_gallery):
    """submit_async: many coroutines at once, one of them cancelled while it waits."""
    x, _ = small_gallery
    batcher = Batcher(workers=2, max_rows=8)
    gate = threading.Event()

    async def main():
        held = batcher.submit_async(_Blocking(searcher, gate), x[:1], 2)
        held2 = batcher.submit_async(_Blocking(searcher, gate), x[:1], 2)  # both workers busy
        waiting = [asyncio.ensure_future(batcher.submit_async(searcher, x[i : i + 1], 3)) for i in range(20)]
        await asyncio.sleep(0.05)
        waiting[5].cancel()
        gate.set()
        got = await asyncio.gather(*waiting, return_exceptions=True)
        return await held, await held2, got

    try:
        held, held2, got = asyncio.run(main())
    finally:
        gate.set()
        batcher.close()
    assert len(held[0]) == len(held2[0]) == 2
    assert isinstance(got[5], asyncio.CancelledError)
    for i, hits in enumerate(got):
        if i != 5:
            want = searcher.search(x[i : i + 1], 3)
            assert [h.row for h in hits[0]] == [h.row for h in want[0]]


def test_a_full_queue_refuses_and_a_late_job_is_dropped(searcher, small_gallery):
    """At most max_queue requests wait; one still queued at its deadline is never searched."""
    x, _ = small_gallery
    batcher = Batcher(workers=1, max_queue=2)
    gate = threading.Event()
    try:
        held = batcher.submit(_Blocking(searcher, gate), x[:1], 2)
        deadline = time.monotonic() + 5
        while batcher.queued() and time.monotonic() < deadline:  # the worker took it
            time.sleep(0.01)
        late = batcher.submit(_Blocking(searcher, gate), x[1:2], 2, timeout_s=0.05)
        batcher.submit(searcher, x[2:3], 2)
        with pytest.raises(QueueFull, match="AQE_MAX_QUEUE"):
            batcher.submit(searcher, x[3:4], 2)
        time.sleep(0.1)
        gate.set()
        assert len(held.result(timeout=10)[0]) == 2
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=10)
        assert len(batcher.search(searcher, x[4:5], 2)[0]) == 2
    finally:
        gate.set()
        batcher.close()


def test_an_expensive_filter_never_holds_back_unfiltered_requests(searcher, small_gallery):
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    gate = threading.Event()
    try:
        slow = batcher.submit(_Blocking(searcher, gate), x[:1], 2, filters={"camera": 1})
        fast = batcher.submit(searcher, x[1:2], 2)
        assert len(fast.result(timeout=5)[0]) == 2 and not slow.done()
        gate.set()
        assert len(slow.result(timeout=10)[0]) == 2
    finally:
        gate.set()
        batcher.close()


def test_an_event_loop_caller_is_answered_at_its_deadline(searcher, small_gallery):
    """A search running past the deadline does not hold its caller; the worker goes on."""
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    gate = threading.Event()

    async def main():
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit_async(_Blocking(searcher, gate), x[:1], 2, timeout_s=0.1)
        waited = time.monotonic() - t0
        gate.set()
        return waited, await batcher.submit_async(searcher, x[1:2], 2, timeout_s=5)

    try:
        waited, hits = asyncio.run(main())
    finally:
        gate.set()
        batcher.close()
    assert 0.09 <= waited < 1 and len(hits[0]) == 2


class _Threads:
    """A searcher stand-in that remembers the thread each search ran on (and can be slow)."""

    def __init__(self, searcher: Searcher, seconds: float = 0.0, per_row: bool = False) -> None:
        self.searcher, self.seconds, self.threads, self.rows = searcher, seconds, [], []
        self.per_row = per_row  # sleep seconds for each row of a search, not once

    def check_queries(self, queries):
        return self.searcher.check_queries(queries)

    def search_checked(self, queries, k, expand=True, filters=None, raw=False):
        self.threads.append(threading.current_thread().name)
        self.rows.append(len(queries))
        time.sleep(self.seconds * (len(queries) if self.per_row else 1))
        return self.searcher.search_checked(queries, k, expand, filters, raw=raw)


def test_an_idle_batcher_answers_a_lone_small_search_inline(searcher, small_gallery, monkeypatch):
    """Inline once its kind was timed cheap; the same answers; never a filter or a large batch."""
    import service.batcher

    # "cheap" by any timing: on a loaded machine a 600-row search can take over the real 2 ms
    monkeypatch.setattr(service.batcher, "INLINE_MAX_S", 1.0)
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    recording = _Threads(searcher)
    here = threading.current_thread().name

    async def main():
        first = await batcher.search_async(recording, x[:1], 3)  # its kind untimed: a worker
        again = [await batcher.search_async(recording, x[i : i + 1], 3) for i in range(1, 4)]
        other = await batcher.search_async(recording, x[:1], 3, raw=True)  # another kind
        big = await batcher.search_async(recording, x[:5], 3)  # over INLINE_MAX_ROWS
        filtered = await batcher.search_async(recording, x[:1], 3, filters={"camera": 1})
        return first, again, other, big, filtered

    try:
        first, again, other, big, filtered = asyncio.run(main())
    finally:
        batcher.close()
    worker = "search-batcher-0"
    assert recording.threads == [worker, here, here, here, worker, worker, "search-filtered-0"]
    assert batcher.inline == 3
    assert first == searcher.search(x[:1], 3)
    assert again == [searcher.search(x[i : i + 1], 3) for i in range(1, 4)]
    assert other == searcher.search(x[:1], 3, raw=True)
    assert big == searcher.search(x[:5], 3)
    assert filtered == searcher.search(x[:1], 3, filters={"camera": 1})


def test_no_inline_search_while_the_workers_are_busy_or_when_it_is_slow(searcher, small_gallery):
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    gate = threading.Event()
    slow = _Threads(searcher, seconds=0.01)  # over INLINE_MAX_S: the loop would stall for it
    cheap = _Threads(searcher)

    async def main():
        await batcher.search_async(slow, x[:1], 2)
        await batcher.search_async(slow, x[:1], 2)
        await batcher.search_async(cheap, x[:1], 2)  # timed on the worker
        held = asyncio.ensure_future(batcher.submit_async(_Blocking(searcher, gate), x[:1], 2))
        while batcher.queued():  # the worker took it
            await asyncio.sleep(0.001)
        behind = asyncio.ensure_future(batcher.search_async(cheap, x[1:2], 2))
        await asyncio.sleep(0.05)
        assert not behind.done()  # queued behind the busy worker, not inline
        gate.set()
        return await held, await behind

    try:
        _, behind = asyncio.run(main())
    finally:
        gate.set()
        batcher.close()
    assert slow.threads == ["search-batcher-0"] * 2 and cheap.threads == ["search-batcher-0"] * 2
    assert batcher.inline == 0 and behind == searcher.search(x[1:2], 2)


def test_requests_that_arrive_together_batch_on_the_workers(searcher, small_gallery):
    """The first yields once before going inline, so those that came with it queue, and so does it."""
    x, _ = small_gallery
    batcher = Batcher(workers=1)
    recording = _Threads(searcher)

    async def main():
        await batcher.search_async(recording, x[:1], 2)  # timed: cheap
        return await asyncio.gather(*(batcher.search_async(recording, x[i : i + 1], 2) for i in range(16)))

    try:
        got = asyncio.run(main())
    finally:
        batcher.close()
    assert batcher.inline == 0 and set(recording.threads) == {"search-batcher-0"}
    assert len(recording.threads) < 1 + 16  # at least two of them shared a FAISS call
    for i, hits in enumerate(got):  # a batch's scores may differ from one query's in the last bits
        [want] = searcher.search(x[i : i + 1], 2)
        assert [h.row for h in hits[0]] == [h.row for h in want]
        np.testing.assert_allclose([h.score for h in hits[0]], [h.score for h in want], atol=1e-5)


def test_a_caller_gone_while_deciding_to_inline_is_counted_as_dropped(searcher, small_gallery):
    x, _ = small_gallery
    drops: list[str] = []
    batcher = Batcher(workers=1, on_drop=drops.append)
    recording = _Threads(searcher)

    async def main():
        await batcher.search_async(recording, x[:1], 2)
        task = asyncio.ensure_future(batcher.search_async(recording, x[1:2], 2))
        await asyncio.sleep(0)  # the task runs up to its yield
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert drops == ["gone"] and len(recording.threads) == 1


@pytest.fixture
def cheap(monkeypatch):
    """Every search counts as cheap enough for the loop (a loaded machine can take over 2 ms)."""
    import service.batcher

    monkeypatch.setattr(service.batcher, "LOOP_MAX_S", 1.0)


def test_on_the_loop_a_turns_requests_share_one_search_on_the_loops_thread(searcher, small_gallery, cheap):
    """Timed once on a worker, then the cheap unfiltered requests of a turn in few calls, here."""
    x, _ = small_gallery
    batcher = Batcher(workers=1, on_loop=True)
    recording = _Threads(searcher)
    here = threading.current_thread().name

    async def main():
        await batcher.search_async(recording, x[:1], 2)  # its kind untimed: a worker times it
        together = await asyncio.gather(
            *(batcher.search_async(recording, x[i : i + 1], 2) for i in range(16))
        )
        filtered = await batcher.search_async(recording, x[:1], 2, filters={"camera": 1})
        return together, filtered

    try:
        together, filtered = asyncio.run(main())
    finally:
        batcher.close()
    turns = recording.threads[1:-1]  # a turn searches for at most its budget (LOOP_BUDGET_S)
    assert recording.threads[0] == "search-batcher-0" and recording.threads[-1] == "search-filtered-0"
    assert set(turns) == {here} and sum(recording.rows[1:-1]) == 16 and batcher.inline == 16
    assert len(turns) < 16  # requests shared a FAISS call
    for i, hits in enumerate(together):  # a batch's scores may differ from one query's in the last bits
        [want] = searcher.search(x[i : i + 1], 2)
        assert [h.row for h in hits[0]] == [h.row for h in want]
        np.testing.assert_allclose([h.score for h in hits[0]], [h.score for h in want], atol=1e-5)
    assert filtered == searcher.search(x[:1], 2, filters={"camera": 1})


def test_on_the_loop_a_turn_searches_for_its_budget_then_lets_the_loop_run(searcher, small_gallery, cheap):
    from service.batcher import LOOP_BUDGET_S

    x, _ = small_gallery
    batcher = Batcher(workers=1, on_loop=True)
    per_row = 0.0005  # each row of a search sleeps this long: 16 rows fill a budget
    recording = _Threads(searcher, seconds=per_row, per_row=True)
    ticks: list[int] = []

    async def ticker():
        while True:  # counts the loop's turns between searches
            ticks.append(len(recording.rows))
            await asyncio.sleep(0)

    async def main():
        await batcher.search_async(recording, x[:1], 2)
        tick = asyncio.ensure_future(ticker())
        got = await asyncio.gather(
            *(batcher.search_async(recording, x[i % 50 : i % 50 + 1], 2) for i in range(48))
        )
        tick.cancel()
        return got

    try:
        got = asyncio.run(main())
    finally:
        batcher.close()
    searched = recording.rows[1:]
    assert sum(searched) == 48 and len(searched) >= 3  # at least 0.5 ms a row, 8 ms a turn
    assert max(searched) <= LOOP_BUDGET_S / per_row + 1
    assert len(set(ticks)) >= len(searched)  # the loop ran between the turns' searches
    assert all(len(hits[0]) == 2 for hits in got)


def test_on_the_loop_callers_gone_or_late_are_dropped_and_counted(searcher, small_gallery, cheap):
    x, _ = small_gallery
    drops: list[str] = []
    batcher = Batcher(workers=1, on_loop=True, on_drop=drops.append)
    recording = _Threads(searcher)

    async def main():
        await batcher.search_async(recording, x[:1], 2)
        gone = asyncio.ensure_future(batcher.search_async(recording, x[1:2], 2))
        late = asyncio.ensure_future(batcher.search_async(recording, x[2:3], 2, timeout_s=1e-9))
        kept = asyncio.ensure_future(batcher.search_async(recording, x[3:4], 2))
        await asyncio.sleep(0)  # all three are pending for the next turn
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        with pytest.raises(DeadlineExceeded):
            await late
        return await kept

    try:
        kept = asyncio.run(main())
    finally:
        batcher.close()
    assert sorted(drops) == ["gone", "late"] and recording.rows == [1, 1]
    assert kept == searcher.search(x[3:4], 2)


def test_on_the_loop_an_expensive_kind_still_goes_to_the_workers(searcher, small_gallery):
    x, _ = small_gallery
    batcher = Batcher(workers=1, on_loop=True)
    slow = _Threads(searcher, seconds=0.01)  # over LOOP_MAX_S a row

    async def main():
        for i in range(3):
            await batcher.search_async(slow, x[i : i + 1], 2)

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert slow.threads == ["search-batcher-0"] * 3 and batcher.inline == 0


def test_search_on_loop_is_on_by_default_with_a_worker_process_per_core(tmp_path, monkeypatch):
    from service import settings as settings_module
    from service.settings import Settings

    monkeypatch.setattr(settings_module, "usable_cores", lambda: 2)
    assert not Settings(index_root=tmp_path, workers=1).searches_on_loop()
    assert Settings(index_root=tmp_path, workers=2).searches_on_loop()
    assert Settings(index_root=tmp_path, workers=1, search_on_loop="on").searches_on_loop()
    assert not Settings(index_root=tmp_path, workers=4, search_on_loop="off").searches_on_loop()


def test_on_the_loop_a_turn_searches_at_most_max_rows(searcher, small_gallery, cheap):
    x, _ = small_gallery
    batcher = Batcher(workers=1, max_rows=8, on_loop=True)
    recording = _Threads(searcher)

    async def main():
        await batcher.search_async(recording, x[:1], 2)
        return await asyncio.gather(*(batcher.search_async(recording, x[i : i + 2], 2) for i in range(20)))

    try:
        got = asyncio.run(main())
    finally:
        batcher.close()
    assert sum(recording.rows[1:]) == 40 and max(recording.rows[1:]) <= 8
    assert all(len(hits) == 2 for hits in got)
