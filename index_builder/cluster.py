"""The Dask cluster a build runs its heavy phases on: connect, pin threads, run tasks with progress.

``--cluster tcp://HOST:8786`` connects to a running scheduler; ``--cluster local:N`` starts a
``LocalCluster`` of N single-threaded worker processes. Tasks are plain functions of paths and
row ranges: each reads what it needs from the shared staging directory and writes its output
there under a temporary name, then renames it (``dist_knn.write_part``), so a task that
Dask reruns after losing its worker writes the same bytes again. Only small results travel back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from index_builder.budget import bound_malloc
from index_builder.progress import progress

logger = logging.getLogger(__name__)

_LOCAL = re.compile(r"^local:(\d+)$")
TASK_SHARE = 4
MAX_ROWS_PER_TASK = 16384
"""A task may use a quarter of its worker's memory limit: Dask spills and pauses from 60-80 %."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where the heavy phases run (``address``) and how they are cut into tasks.

    ``worker_bytes``: the memory one task may plan for (default: a quarter of the smallest
    worker's limit, set on connecting); ``rows_per_task``: rows of a read, expand or merge task
    (default: :meth:`rows_for`);
    ``tile``: tile side of the exact tile-pair tasks; ``group_bytes``: the members and probers
    one IVF list-group task holds. Any partitioning publishes the same result.
    """

    address: str
    rows_per_task: int | None = None
    tile: int | None = None
    group_bytes: int | None = None
    worker_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        check_address(self.address)
        for name in ("rows_per_task", "tile", "group_bytes", "worker_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def rows_for(self, d: int) -> int:
        """Rows of a row-range task: ``rows_per_task``, else what fits ``worker_bytes`` (<= 16384).

        A read task holds its rows twice (read, normalised) and an assignment task its rows and
        their distances: ``16 d`` bytes a row leaves room for the worker's own arrays.
        """
        if self.rows_per_task is not None:
            return self.rows_per_task
        return max(256, min(MAX_ROWS_PER_TASK, self.worker_bytes // (16 * d)))

    def tile_for(self, d: int, k: int) -> int:
        """Tile side: ``tile``, else the largest of 2048, 1024, ... whose pair task fits."""
        if self.tile is not None:
            return self.tile
        for t in (2048, 1024, 512, 256, 128):
            if 8 * t * t + 8 * t * d + 24 * t * k <= self.worker_bytes:
                return t
        return 128

    def group_limit(self, d: int, k: int) -> int:
        """Bytes of members and probers one list-group task may hold."""
        return self.group_bytes if self.group_bytes is not None else self.worker_bytes // 2


def check_address(address: str) -> str:
    """``address`` if it is ``local:N`` (N >= 1) or a scheduler URL, else ValueError."""
    m = _LOCAL.match(address)
    if (m and int(m.group(1)) >= 1) or re.match(r"^(tcp|tls|inproc|ucx)://\S+$", address):
        return address
    raise ValueError(
        f"cluster {address!r} is neither local:N (N >= 1) nor a scheduler URL like tcp://host:8786"
    )


@contextmanager
def connect(address: str, memory_limit: str | int = "auto") -> Iterator[Any]:
    """A ``distributed.Client`` on ``address`` (``local:N`` starts a LocalCluster of N processes)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # the optional extra
        raise ValueError(
            "--cluster needs the 'distributed' extra: pip install 'aqe-retrieval[distributed]'"
        ) from exc
    m = _LOCAL.match(check_address(address))
    if m:
        import dask

        # nannies restart a worker whose RSS passes 95 % of its limit, and RSS counts the file
        # pages of the memory-mapped staging arrays (reclaimable): measured, a 77 MB gallery's
        # level index killed 256 MiB workers four times over. The limit stays the tasks' plan.
        with dask.config.set({"distributed.worker.memory.terminate": False}):
            cluster = LocalCluster(
                n_workers=int(m.group(1)),
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                memory_limit=memory_limit,
            )
        client = Client(cluster)
    else:
        cluster, client = None, Client(address)
    try:
        if client.dashboard_link:
            logger.info("Dask dashboard: %s", client.dashboard_link)
        logger.info("cluster %s: %d worker(s)", address, len(client.scheduler_info()["workers"]))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_memory(client: Any) -> int | None:
    """The smallest worker memory limit of the cluster in bytes, None if no worker has one."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    limits = [m for m in limits if m]
    return min(limits) if limits else None


@contextmanager
def pinned_threads() -> Iterator[int]:
    """Inside a task: OpenMP (FAISS) and BLAS threads limited to the worker's ``--nthreads``.

    glibc is also told to hand freed large blocks back (:func:`~index_builder.budget.bound_malloc`),
    as an out-of-core build does: a worker's memory limit is its budget.
    """
    bound_malloc()
    try:
        from distributed import get_worker

        nthreads = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        nthreads = 1
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(nthreads)
    try:
        with threadpool_limits(nthreads):
            yield nthreads
    finally:
        faiss.omp_set_num_threads(saved)


def run_tasks(
    client: Any,
    label: str,
    fn: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    weights: Sequence[int] | None = None,
    show_progress: bool | None = None,
) -> list[Any]:
    """``fn(*task)`` for every task on the cluster; results in task order, progress per task.

    Tasks are submitted with ``pure=False`` and retried up to twice when their worker dies.
    ``weights``: units each task counts for in the progress (default 1 each).
    """
    from distributed import as_completed

    weights = list(weights) if weights is not None else [1] * len(tasks)
    futures = [client.submit(fn, *t, pure=False, retries=2) for t in tasks]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    with progress(label, sum(weights), unit="units", enabled=show_progress) as update:
        for future in as_completed(futures):
            i = index[future.key]
            results[i] = future.result()
            update(weights[i])
    return results


def open_rows(path: Path, mode: Literal["r", "r+"] = "r") -> Any:
    """A memory-mapped ``.npy`` array (``mode`` ``r`` or ``r+``): an ``np.memmap``, typed Any."""
    return np.load(path, mmap_mode=mode, allow_pickle=False)


def ranges(n: int, step: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges of at most ``step`` rows covering ``[0, n)``."""
    return [(lo, min(n, lo + step)) for lo in range(0, n, max(1, step))]
