"""Batch search over the inverted lists of an ``IVF<nlist>,Flat`` index: one GEMM per list.

Every row is assigned to its ``nprobe`` nearest lists once (the coarse assignment), then each
list's rows are scored against all the rows that probe it in one GEMM, instead of one list scan
per row: the same candidates as ``index.search(u, k)`` at that ``nprobe``. Extra memory:
``N * nprobe * 4`` bytes of list assignments, plus the per-worker heaps (``index_builder.pool``)
and tiles of at most ``SYMMETRIC_TILE**2`` values. Under a memory budget the assignment is a
memory-mapped file, the lists are on disk, and rows are searched one stripe at a time: each list's
members and the stripe's rows that probe it are read when its task runs.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr

from aqe_retrieval.errors import KnnConfigError
from index_builder.ondisk import OnDiskLists, fill_ondisk
from index_builder.pool import (
    Progress,
    Ticker,
    merge_heaps,
    result_heaps,
    run_tiles,
    single_threaded_blas,
    worker_count,
)
from index_builder.storage import ArrayStore
from index_builder.symmetric import SYMMETRIC_TILE


def batch_self_knn(
    index: Any,
    u: np.ndarray,
    k: int,
    nprobe: int | None,
    block_size: int,
    progress: Progress | None = None,
    *,
    workers: int | None = None,
    tile: int = SYMMETRIC_TILE,
    stripe: int | None = None,
    lists: OnDiskLists | None = None,
    store: ArrayStore | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fill the trained, empty ``IndexIVFFlat`` ``index`` with ``u`` and batch-search it.

    The coarse assignment is computed once (into ``store``'s ``assign`` array, a memmap out of
    core): its first column places every row in its list (no second quantizer pass for
    ``add``; the lists go on disk when ``lists`` is given), all its columns drive
    :func:`batch_list_search`.
    """
    ivf = faiss.extract_index_ivf(index)
    probes = min(nprobe or 1, ivf.nlist)
    assign = (store or ArrayStore()).empty("assign", (u.shape[0], probes), np.int32)
    coarse_assignment(index, u, probes, block_size, out=assign)
    if lists is not None:
        fill_ondisk(index, u, lists, coarse=assign[:, 0])
    else:
        for lo in range(0, u.shape[0], block_size):
            xb, near = u[lo : lo + block_size], assign[lo : lo + block_size, 0].astype(np.int64)
            ivf.add_core(len(xb), swig_ptr(xb), None, swig_ptr(near))
    try:
        return batch_list_search(
            index,
            u,
            k,
            probes,
            block_size,
            progress,
            assign,
            workers=workers,
            tile=tile,
            stripe=stripe,
            out=out,
        )
    finally:
        del assign
        if store is not None:
            store.discard("assign")


def coarse_assignment(
    index: Any, u: np.ndarray, nprobe: int, block_size: int, out: np.ndarray | None = None
) -> np.ndarray:
    """The ``nprobe`` nearest inverted lists of every row of ``u``: (n, nprobe) int32, nearest first."""
    ivf = faiss.extract_index_ivf(index)
    assign = np.empty((u.shape[0], nprobe), dtype=np.int32) if out is None else out
    for lo in range(0, u.shape[0], block_size):
        block = ivf.quantizer.search(np.ascontiguousarray(u[lo : lo + block_size]), nprobe)[1]
        if (block < 0).any():
            raise KnnConfigError(f"the coarse quantizer of {ivf.nlist} lists returned no list")
        assign[lo : lo + block_size] = block
    return assign


def batch_list_search(
    index: Any,
    u: np.ndarray,
    k: int,
    nprobe: int | None,
    block_size: int,
    progress: Progress | None = None,
    assign: np.ndarray | None = None,
    *,
    workers: int | None = None,
    tile: int = SYMMETRIC_TILE,
    stripe: int | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of every row of ``u`` in the ``IndexIVFFlat`` ``index`` over ``u``, list by list.

    The same candidates as ``index.search(u, k)`` at ``nprobe`` (the rows of the ``nprobe``
    nearest lists), scored by one GEMM per inverted list (chunked to ``tile**2`` values) instead
    of one scan per row. ``assign``: :func:`coarse_assignment`, if known (it is consumed).
    Returns (sims, ids) (n, k), best first, ``-1`` padded. Extra memory: ``n * nprobe * 4``
    bytes plus the per-worker heaps and tiles. ``stripe``: rows searched at a time (default
    all): each stripe copies its rows of ``assign`` (a memmap, say), holds heaps of
    ``workers * stripe * k * 12`` bytes and writes its result into ``out`` (sims, ids).
    """
    ivf = faiss.extract_index_ivf(index)
    n = u.shape[0]
    nprobe = min(nprobe or ivf.nprobe, ivf.nlist)
    if assign is None:
        assign = coarse_assignment(index, u, nprobe, block_size)
    workers = workers or worker_count()
    ticker = Ticker(progress, n, n * assign.shape[1])
    if stripe is None or stripe >= n:
        return _search_rows(ivf, u, k, assign, 0, workers, tile, ticker)
    sims, ids = out or (np.empty((n, k), np.float32), np.empty((n, k), np.int64))
    for s0 in range(0, n, stripe):
        s1 = min(n, s0 + stripe)
        part = np.array(assign[s0:s1], dtype=np.int32)
        sims[s0:s1], ids[s0:s1] = _search_rows(ivf, u, k, part, s0, workers, tile, ticker)
    return sims, ids


def _search_rows(
    ivf: Any, u: np.ndarray, k: int, assign: np.ndarray, s0: int, workers: int, tile: int, ticker: Ticker
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of rows [s0, s0 + len(assign)) of ``u``, whose lists ``assign`` holds (consumed)."""
    m = assign.shape[0]
    # afterwards assign.ravel()[lims[l]:lims[l + 1]] are the rows (from s0) that probe list l
    lims = faiss.matrix_bucket_sort_inplace(assign, nbucket=ivf.nlist, nt=faiss.omp_get_max_threads())
    queries = assign.ravel()
    sizes = [ivf.invlists.list_size(lst) for lst in range(ivf.nlist)]
    tasks = []
    for lst, size in enumerate(sizes):
        lo, hi = int(lims[lst]), int(lims[lst + 1])
        # a chunk's scores (rows x list) and gathered rows (rows x d) stay within one tile
        step = max(1, tile**2 // max(size, u.shape[1], 1))
        tasks += [(lst, q, min(hi, q + step)) for q in range(lo, hi, step) if size]
    tasks.sort(key=lambda t: (t[2] - t[1]) * sizes[t[0]], reverse=True)
    heaps = result_heaps(m, k, workers)

    def scan(task: tuple[int, int, int], slot: int) -> None:
        lst, q0, q1 = task
        ids, rows = inverted_list_ids(ivf.invlists, lst), queries[q0:q1].astype(np.int64)
        # the members from the list's own codes (IVF,Flat: the rows themselves, in id order), read
        # in one sweep of the list, not gathered from u one row at a time
        s = u[rows + s0] @ inverted_list_rows(ivf.invlists, lst, u.shape[1]).T
        heaps[slot].heaps.addn_query_subset_with_ids(
            len(rows), swig_ptr(rows), len(ids), swig_ptr(s), swig_ptr(ids), 0
        )

    with single_threaded_blas(workers):
        run_tiles(tasks, scan, workers, lambda t: ticker(t[2] - t[1]))
    return merge_heaps(heaps)


def inverted_list_rows(invlists: Any, lst: int, d: int) -> np.ndarray:
    """The float32 rows stored in inverted list ``lst`` of an IVF,Flat index: (size, d), a view.

    The view is into the lists' own memory (on-disk lists: the mapped file); valid while the
    index is alive (``release_codes`` is a no-op for array and on-disk lists).
    """
    size = invlists.list_size(lst)
    if size == 0:
        return np.empty((0, d), dtype=np.float32)
    codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * d * 4)
    return codes.view(np.float32).reshape(size, d)


def inverted_list_ids(invlists: Any, lst: int) -> np.ndarray:
    """The row ids stored in inverted list ``lst``: (size,) int64, copied."""
    size = invlists.list_size(lst)
    if size == 0:
        return np.empty(0, dtype=np.int64)
    ptr = invlists.get_ids(lst)
    try:
        return faiss.rev_swig_ptr(ptr, size).copy()
    finally:
        invlists.release_ids(lst, ptr)
