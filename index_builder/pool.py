"""The tile worker pool of the blockwise kNN kernels: threads, progress, per-worker heaps.

Tiles run on ``faiss.omp_get_max_threads()`` worker threads (``--threads``), each with
single-threaded BLAS (via ``threadpoolctl``) and its own ``faiss.ResultHeap``, folded into one at
the end. Heaps cost ``(workers - 1) * N * k * 12`` bytes beyond the result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import faiss
import numpy as np
from faiss import swig_ptr
from threadpoolctl import threadpool_limits

Progress = Callable[[int], None]
"""Called with the number of rows just done."""
Task = TypeVar("Task")


def worker_count() -> int:
    """Worker threads for the tiled kernels: FAISS's thread count (``--threads``)."""
    return max(1, faiss.omp_get_max_threads())


def run_tiles(
    tasks: Sequence[Task], work: Callable[[Task, int], None], workers: int, done: Callable[[Task], None]
) -> None:
    """``work(task, slot)`` for every task on ``workers`` threads (slot = the worker's number).

    Always in threads of their own, even one: each sets its own OpenMP thread count to 1, so
    FAISS heap insertions inside a task run serially (``symmetric.add_columns`` relies on it)
    while the caller's setting is left alone. ``done(task)`` runs under a lock.
    """
    lock = threading.Lock()
    pending: Iterator[Task] = iter(tasks)
    errors: list[BaseException] = []

    def loop(slot: int) -> None:
        faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
        try:
            while not errors:
                with lock:
                    task = next(pending, None)
                if task is None:
                    return
                work(task, slot)
                with lock:
                    done(task)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(slot,), daemon=True) for slot in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def single_threaded_blas(workers: int) -> AbstractContextManager[Any]:
    """BLAS limited to one thread while ``workers`` > 1 threads each run their own GEMMs.

    Shared multi-threaded BLAS calls from several workers measured 15-45 % slower on 2 cores.
    """
    return nullcontext() if workers == 1 else threadpool_limits(1, user_api="blas")


def result_heaps(n: int, k: int, workers: int) -> list[Any]:
    """One max-heap ``faiss.ResultHeap`` of ``n`` rows x ``k`` per worker."""
    return [faiss.ResultHeap(n, k, keep_max=True) for _ in range(workers)]


def merge_heaps(heaps: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Fold per-worker heaps into the first; (sims (n, k) float32, ids (n, k) int64), best first."""
    first = heaps[0]
    for other in heaps[1:]:
        first.heaps.addn_with_ids(first.k, swig_ptr(other.D), swig_ptr(other.I), first.k, 0, first.nq)
    first.finalize()
    return first.D, first.I


class Ticker:
    """Turns units of work done (any scale) into row counts that add up to exactly ``n``."""

    def __init__(self, progress: Progress | None, n: int, total: int) -> None:
        self.progress, self.n, self.total = progress, n, max(total, 1)
        self.done = self.reported = 0

    def __call__(self, units: int) -> None:
        """Count ``units`` more done; report the rows they complete."""
        self.done += units
        rows = self.n * self.done // self.total
        if self.progress and rows > self.reported:
            self.progress(rows - self.reported)
        self.reported = rows
