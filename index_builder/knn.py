"""Blockwise inner-product kNN over L2-normalised rows with FAISS: never an N x N matrix.

Three routes to every row's top-k among all rows (itself included), results best first:

* **exact, symmetric** (``exact_kernel="symmetric"``, the default above ``SYMMETRIC_MIN_N``
  rows): ``S = U U^T`` is symmetric, so each tile pair (a, b >= a) is one GEMM, and its values
  feed the top-k of both sides: the rows of block a (a ``faiss.ResultHeap`` insertion) and the
  rows of block b (the tile's columns, filtered by those rows' current k-th best value first, so
  the transposed tile is never copied). Half the flops of a full scan; similarities are the GEMM's
  own values.
* **exact, faiss** (``exact_kernel="faiss"``): ``faiss.knn`` for one block of rows at a time
  against all rows; cheaper below ``SYMMETRIC_MIN_N`` rows.
* **approximate**: any FAISS factory string, trained on a seeded sample and searched block by block
  with per-call parameters; or, for ``IVF<nlist>,Flat`` with ``batch_lists=True``, batch search
  over the inverted lists (every row assigned to its ``nprobe`` lists once, then one GEMM per list
  against all the rows that probe it). Its neighbour sets are checked against exact kNN on a
  sample of rows: that recall is what the approximation costs.

Tiles run on ``faiss.omp_get_max_threads()`` worker threads, each with single-threaded BLAS (via
``threadpoolctl``) and its own result heap, folded into one at the end. Extra memory of the
symmetric and batch routes: ``workers * 5 * SYMMETRIC_TILE**2`` bytes of tiles (more only while
``k`` is comparable to the tile) plus ``(workers - 1) * N * k * 12`` bytes of heaps; the batch
route adds ``N * nprobe * 4`` bytes of list assignments.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr
from threadpoolctl import threadpool_limits

from aqe_retrieval.errors import KnnConfigError
from aqe_retrieval.faiss_search import exact_knn, search_parameters

logger = logging.getLogger(__name__)

EXACT = "exact"
EXACT_KERNELS = ("auto", "symmetric", "faiss")
SYMMETRIC_MIN_N = 4096
"""``auto`` uses the symmetric kernel from this many rows on. Measured (bench_knn.py --sweep, d = 512,
2 cores, 2026-11-30): against faiss.knn 0.51x at 1,000 rows, 0.79x at 2,000, 1.01x at 4,000,
1.51x at 8,000 and 1.81x at 100,000."""
SYMMETRIC_TILE = 2048
"""Tile side of the symmetric kernel (capped by the block size): a 16 MiB float32 tile. Measured at
N = 40,000, d = 512 (bench_knn.py --tiles, best of 2): 4.73 s (1024), 4.52 s (1536), 4.76 s (2048),
5.02 s (4096): flat from 1024 to 2048; 2048 reached 0.875 of the GEMM peak at N = 100,000."""
Progress = Callable[[int], None]


@dataclass(frozen=True)
class KnnSpec:
    """How to find neighbours: ``exact`` or a FAISS factory string plus its search knobs.

    ``exact_kernel``: ``auto`` | ``symmetric`` | ``faiss`` (exact mode). ``batch_lists``: search an
    ``IVF<nlist>,Flat`` index list by list (one GEMM per inverted list) instead of row by row.
    """

    method: str = EXACT
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int | None = None
    recall_sample: int = 1000
    seed: int = 0
    exact_kernel: str = "auto"
    batch_lists: bool = False

    def __post_init__(self) -> None:
        if self.exact_kernel not in EXACT_KERNELS:
            raise ValueError(f"exact_kernel must be one of {EXACT_KERNELS}, got {self.exact_kernel!r}")
        if self.batch_lists and self.exact:
            raise ValueError("batch_lists needs an IVF index (e.g. method='IVF4096,Flat'), not exact")

    @property
    def exact(self) -> bool:
        return self.method.lower() in (EXACT, "flat")


@dataclass(frozen=True)
class KnnResult:
    """Top-k neighbours of every row: ``ids`` (n, k) int64, ``sims`` (n, k) float32, best first."""

    ids: np.ndarray
    sims: np.ndarray
    recall: float | None
    recall_sample: int
    seconds: float
    index: Any = None


def build_index(
    u: np.ndarray, spec: KnnSpec, block_size: int, progress: Progress | None = None, add: bool = True
):
    """A trained FAISS inner-product index over ``u`` (n, d) float32, built from ``spec.method``.

    With ``add=False`` the index is trained but left empty.
    """
    n, d = u.shape
    index = _factory(d, spec)
    if not index.is_trained:
        sample = _train_sample(u, index, spec)
        logger.info("training %s on %d rows", spec.method, len(sample))
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise KnnConfigError(
                f"training {spec.method!r} on {len(sample)} rows failed: {_first_line(exc)}"
            ) from exc
    for lo in range(0, n if add else 0, block_size):
        index.add(np.ascontiguousarray(u[lo : lo + block_size]))
        if progress:
            progress(min(block_size, n - lo))
    return index


def self_knn(
    u: np.ndarray, k: int, spec: KnnSpec, block_size: int, progress: Progress | None = None
) -> KnnResult:
    """Top-``k`` neighbours of every row of ``u`` (n, d) float32 among all rows, itself included."""
    t0 = time.perf_counter()
    u = np.ascontiguousarray(u, dtype=np.float32)
    n = u.shape[0]
    index = None
    if spec.exact and use_symmetric(n, spec.exact_kernel):
        sims, ids = symmetric_self_knn(u, k, min(block_size, SYMMETRIC_TILE), progress)
    elif spec.batch_lists:
        if not isinstance(faiss.downcast_index(_factory(u.shape[1], spec)), faiss.IndexIVFFlat):
            raise KnnConfigError(f"batch_lists needs an 'IVF<nlist>,Flat' index, got {spec.method!r}")
        index = build_index(u, spec, block_size, add=False)
        sims, ids = batch_self_knn(index, u, k, spec.nprobe, block_size, progress)
    else:
        if spec.exact:
            search = lambda xq: exact_knn(xq, u, k)  # noqa: E731
        else:
            index = build_index(u, spec, block_size)
            params = search_parameters(index, spec.nprobe, spec.ef_search)
            search = lambda xq: index.search(xq, k, params=params)  # noqa: E731
        ids = np.empty((n, k), dtype=np.int64)
        sims = np.empty((n, k), dtype=np.float32)
        for lo in range(0, n, block_size):
            hi = min(n, lo + block_size)
            sims[lo:hi], ids[lo:hi] = search(np.ascontiguousarray(u[lo:hi]))
            if progress:
                progress(hi - lo)
    missing = ids < 0
    if missing.any():
        # An approximate index can return fewer than k hits (empty inverted lists): fall back to
        # exact search for those rows rather than averaging padding.
        rows = np.flatnonzero(missing.any(axis=1))
        logger.warning("%d rows got fewer than %d neighbours; searched exactly", len(rows), k)
        sims[rows], ids[rows] = exact_knn(u[rows], u, k)
    recall, sample = (None, 0)
    if not spec.exact:
        rows = sample_rows(n, spec.recall_sample, spec.seed)
        recall, sample = set_recall(ids[rows], exact_knn(u[rows], u, k)[1]), len(rows)
    return KnnResult(ids, sims, recall, sample, time.perf_counter() - t0, index)


def use_symmetric(n: int, exact_kernel: str = "auto") -> bool:
    """Whether exact kNN over ``n`` rows runs the symmetric kernel (``auto``: from SYMMETRIC_MIN_N)."""
    return exact_kernel == "symmetric" or (exact_kernel == "auto" and n >= SYMMETRIC_MIN_N)


def symmetric_self_knn(
    u: np.ndarray, k: int, tile: int = SYMMETRIC_TILE, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``u`` (n, d) float32 against itself: (sims, ids) (n, k), best first.

    Diagonal tiles first (each fills only its own rows' heaps, so they run in parallel on one
    heap); their k-th best values then serve as a floor that keeps the column side sparse.
    """
    n = u.shape[0]
    starts = range(0, n, tile)
    diagonal = [(a, a) for a in starts]
    off = [(a, b) for a in starts for b in starts if b > a]
    workers = _workers()
    result = faiss.ResultHeap(n, k, keep_max=True)
    heaps = [result] + [faiss.ResultHeap(n, k, keep_max=True) for _ in range(workers - 1)]
    buffers = [np.empty(min(tile, n) ** 2, dtype=np.float32) for _ in range(workers)]
    floor = np.empty(0, dtype=np.float32)

    def gemm(a0: int, b0: int, slot: int) -> np.ndarray:
        xa, xb = u[a0 : a0 + tile], u[b0 : b0 + tile]
        s = buffers[slot][: len(xa) * len(xb)].reshape(len(xa), len(xb))
        return np.matmul(xa, xb.T, out=s)

    def diagonal_tile(task: tuple[int, int], slot: int) -> None:
        s = gemm(*task, slot)
        result.heaps.addn(s.shape[1], swig_ptr(s), task[0], task[0], s.shape[0])

    def off_tile(task: tuple[int, int], slot: int) -> None:
        a0, b0 = task
        s = gemm(a0, b0, slot)
        heap = heaps[slot]
        heap.heaps.addn(s.shape[1], swig_ptr(s), b0, a0, s.shape[0])
        # every heap's k-th best bounds the final one from below (the other workers' heaps are
        # read while they change: any value read is one they held, so still a lower bound)
        bound = floor[b0 : b0 + s.shape[1]]
        for other in heaps:
            if other is not heap:
                bound = np.maximum(bound, other.D[b0 : b0 + s.shape[1], 0])
        add_columns(heap, s, a0, b0, bound)

    cells = lambda t: min(tile, n - t[0]) * min(tile, n - t[1])  # noqa: E731
    ticker = _Ticker(progress, n, sum(cells(t) for t in diagonal + off))
    with _single_threaded_blas(workers):
        _run(diagonal, diagonal_tile, workers, lambda t: ticker(cells(t)))
        floor = result.D[:, 0].copy()
        _run(off, off_tile, workers, lambda t: ticker(cells(t)))
    return _merge(heaps)


def add_columns(heap, s: np.ndarray, a0: int, b0: int, bound: np.ndarray) -> None:
    """Merge the columns of tile ``s`` (rows a0.., columns b0..) into ``heap``'s rows b0...

    Only values above ``bound`` (bj,) (a lower bound of each row's final k-th best) and the
    heap's own k-th best can enter, so candidates are found with one vectorised comparison,
    without transposing the tile, and each is offered to its row's heap on its own.
    """
    bj = s.shape[1]
    threshold = np.maximum(heap.D[b0 : b0 + bj, 0], bound)
    flat = np.flatnonzero(s > threshold)
    if flat.size == 0:
        return
    values = np.ascontiguousarray(s.ravel()[flat])
    rows, cols = np.divmod(flat, bj)
    subset, ids = cols + b0, rows + a0
    # one value per entry, rows repeated: safe because tile workers run FAISS serially (_run)
    heap.heaps.addn_query_subset_with_ids(
        values.size, swig_ptr(subset), 1, swig_ptr(values), swig_ptr(ids), 1
    )


def batch_self_knn(
    index,
    u: np.ndarray,
    k: int,
    nprobe: int | None,
    block_size: int,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fill the trained, empty ``IndexIVFFlat`` ``index`` with ``u`` and batch-search it.

    The coarse assignment is computed once: its first column places every row in its list (no
    second quantizer pass for ``add``), all its columns drive :func:`batch_list_search`.
    """
    ivf = faiss.extract_index_ivf(index)
    assign = coarse_assignment(index, u, min(nprobe or 1, ivf.nlist), block_size)
    for lo in range(0, u.shape[0], block_size):
        xb, near = u[lo : lo + block_size], assign[lo : lo + block_size, 0].astype(np.int64)
        ivf.add_core(len(xb), swig_ptr(xb), None, swig_ptr(near))
    return batch_list_search(index, u, k, assign.shape[1], block_size, progress, assign)


def coarse_assignment(index, u: np.ndarray, nprobe: int, block_size: int) -> np.ndarray:
    """The ``nprobe`` nearest inverted lists of every row of ``u``: (n, nprobe) int32, nearest first."""
    ivf = faiss.extract_index_ivf(index)
    assign = np.empty((u.shape[0], nprobe), dtype=np.int32)
    for lo in range(0, u.shape[0], block_size):
        assign[lo : lo + block_size] = ivf.quantizer.search(u[lo : lo + block_size], nprobe)[1]
    if (assign < 0).any():
        raise KnnConfigError(f"the coarse quantizer of {ivf.nlist} lists returned no list")
    return assign


def batch_list_search(
    index,
    u: np.ndarray,
    k: int,
    nprobe: int | None,
    block_size: int,
    progress: Progress | None = None,
    assign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of every row of ``u`` in the ``IndexIVFFlat`` ``index`` over ``u``, list by list.

    The same candidates as ``index.search(u, k)`` at ``nprobe`` (the rows of the ``nprobe``
    nearest lists), scored by one GEMM per inverted list (chunked to ``SYMMETRIC_TILE**2``
    values) instead of one scan per row. ``assign``: :func:`coarse_assignment`, if known (it is
    consumed). Returns (sims, ids) (n, k), best first, ``-1`` padded. Extra memory:
    ``n * nprobe * 4`` bytes plus the per-worker heaps and tiles.
    """
    ivf = faiss.extract_index_ivf(index)
    n = u.shape[0]
    nprobe = min(nprobe or ivf.nprobe, ivf.nlist)
    if assign is None:
        assign = coarse_assignment(index, u, nprobe, block_size)
    # afterwards assign.ravel()[lims[l]:lims[l + 1]] are the rows that probe list l
    lims = faiss.matrix_bucket_sort_inplace(assign, nbucket=ivf.nlist, nt=faiss.omp_get_max_threads())
    queries = assign.ravel()
    list_ids = [_list_ids(ivf.invlists, lst) for lst in range(ivf.nlist)]
    tasks = []
    for lst, ids in enumerate(list_ids):
        lo, hi = int(lims[lst]), int(lims[lst + 1])
        # a chunk's scores (rows x list) and gathered rows (rows x d) stay within one tile
        step = max(1, SYMMETRIC_TILE**2 // max(len(ids), u.shape[1], 1))
        tasks += [(lst, q, min(hi, q + step)) for q in range(lo, hi, step) if len(ids)]
    tasks.sort(key=lambda t: (t[2] - t[1]) * len(list_ids[t[0]]), reverse=True)
    workers = _workers()
    heaps = [faiss.ResultHeap(n, k, keep_max=True) for _ in range(workers)]

    def scan(task: tuple[int, int, int], slot: int) -> None:
        lst, q0, q1 = task
        ids, rows = list_ids[lst], queries[q0:q1].astype(np.int64)
        s = u[rows] @ u[ids].T
        heaps[slot].heaps.addn_query_subset_with_ids(
            len(rows), swig_ptr(rows), len(ids), swig_ptr(s), swig_ptr(ids), 0
        )

    ticker = _Ticker(progress, n, len(queries))
    with _single_threaded_blas(workers):
        _run(tasks, scan, workers, lambda t: ticker(t[2] - t[1]))
    return _merge(heaps)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``min(n, size)`` distinct row numbers."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def set_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's ``truth`` ids (m, k) present in ``found`` (m, k')."""
    if truth.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


class _Ticker:
    """Turns units of work done (any scale) into row counts that add up to exactly ``n``."""

    def __init__(self, progress: Progress | None, n: int, total: int) -> None:
        self.progress, self.n, self.total = progress, n, max(total, 1)
        self.done = self.reported = 0

    def __call__(self, units: int) -> None:
        self.done += units
        rows = self.n * self.done // self.total
        if self.progress and rows > self.reported:
            self.progress(rows - self.reported)
        self.reported = rows


def _run(
    tasks: Sequence, work: Callable[[Any, int], None], workers: int, done: Callable[[Any], None]
) -> None:
    """``work(task, slot)`` for every task on ``workers`` threads (slot = the worker's number).

    Always in threads of their own, even one: each sets its own OpenMP thread count to 1, so
    FAISS heap insertions inside a task run serially (``add_columns`` relies on it) while the
    caller's setting is left alone.
    """
    lock = threading.Lock()
    pending: Iterable = iter(tasks)
    errors: list[BaseException] = []

    def loop(slot: int) -> None:
        faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
        try:
            while not errors:
                with lock:
                    task = next(pending, None)  # type: ignore[call-overload]
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


def _merge(heaps: list) -> tuple[np.ndarray, np.ndarray]:
    """Fold per-worker heaps into the first; (sims, ids) sorted best first."""
    first = heaps[0]
    for other in heaps[1:]:
        first.heaps.addn_with_ids(first.k, swig_ptr(other.D), swig_ptr(other.I), first.k, 0, first.nq)
    first.finalize()
    return first.D, first.I


def _workers() -> int:
    """Worker threads for the tiled kernels: FAISS's thread count (``--threads``)."""
    return max(1, faiss.omp_get_max_threads())


def _single_threaded_blas(workers: int) -> AbstractContextManager:
    """BLAS limited to one thread while ``workers`` > 1 threads each run their own GEMMs.

    Shared multi-threaded BLAS calls from several workers measured 15-45 % slower on 2 cores.
    """
    return nullcontext() if workers == 1 else threadpool_limits(1, user_api="blas")


def _list_ids(invlists, lst: int) -> np.ndarray:
    size = invlists.list_size(lst)
    if size == 0:
        return np.empty(0, dtype=np.int64)
    ptr = invlists.get_ids(lst)
    try:
        return faiss.rev_swig_ptr(ptr, size).copy()
    finally:
        invlists.release_ids(lst, ptr)


def _factory(d: int, spec: KnnSpec):
    try:
        return faiss.index_factory(d, "Flat" if spec.exact else spec.method, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise KnnConfigError(f"FAISS cannot build index {spec.method!r}: {_first_line(exc)}") from exc


def _train_sample(u: np.ndarray, index, spec: KnnSpec) -> np.ndarray:
    n = u.shape[0]
    size = spec.train_size
    if size is None:
        ivf = faiss.try_extract_index_ivf(index)
        size = max(50 * ivf.nlist, 10_000) if ivf is not None else 100_000
    return np.ascontiguousarray(u[sample_rows(n, size, spec.seed)])


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
