"""Batch search over the inverted lists of an ``IVF<nlist>,Flat`` index: one GEMM per list.

Every row is assigned to its ``nprobe`` nearest lists once (the coarse assignment), then each
list's rows are scored against all the rows that probe it in one GEMM, instead of one list scan
per row: the same candidates as ``index.search(u, k)`` at that ``nprobe``. Extra memory:
``N * nprobe * 4`` bytes of list assignments, plus the per-worker heaps (``index_builder.pool``)
and tiles of at most ``SYMMETRIC_TILE**2`` values.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr

from aqe_retrieval.errors import KnnConfigError
from index_builder.pool import (
    Progress,
    Ticker,
    merge_heaps,
    result_heaps,
    run_tiles,
    single_threaded_blas,
    worker_count,
)
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
    return batch_list_search(
        index, u, k, assign.shape[1], block_size, progress, assign, workers=workers, tile=tile
    )


def coarse_assignment(index: Any, u: np.ndarray, nprobe: int, block_size: int) -> np.ndarray:
    """The ``nprobe`` nearest inverted lists of every row of ``u``: (n, nprobe) int32, nearest first."""
    ivf = faiss.extract_index_ivf(index)
    assign = np.empty((u.shape[0], nprobe), dtype=np.int32)
    for lo in range(0, u.shape[0], block_size):
        assign[lo : lo + block_size] = ivf.quantizer.search(u[lo : lo + block_size], nprobe)[1]
    if (assign < 0).any():
        raise KnnConfigError(f"the coarse quantizer of {ivf.nlist} lists returned no list")
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
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of every row of ``u`` in the ``IndexIVFFlat`` ``index`` over ``u``, list by list.

    The same candidates as ``index.search(u, k)`` at ``nprobe`` (the rows of the ``nprobe``
    nearest lists), scored by one GEMM per inverted list (chunked to ``tile**2`` values) instead
    of one scan per row. ``assign``: :func:`coarse_assignment`, if known (it is consumed).
    Returns (sims, ids) (n, k), best first, ``-1`` padded. Extra memory: ``n * nprobe * 4``
    bytes plus the per-worker heaps and tiles.
    """
    ivf = faiss.extract_index_ivf(index)
    n = u.shape[0]
    nprobe = min(nprobe or ivf.nprobe, ivf.nlist)
    if assign is None:
        assign = coarse_assignment(index, u, nprobe, block_size)
    # afterwards assign.ravel()[lims[l]:lims[l + 1]] are the rows that probe list l
    lims = faiss.matrix_bucket_sort_inplace(assign, nbucket=ivf.nlist, nt=faiss.omp_get_max_threads())
    queries = assign.ravel()
    list_ids = [inverted_list_ids(ivf.invlists, lst) for lst in range(ivf.nlist)]
    tasks = []
    for lst, ids in enumerate(list_ids):
        lo, hi = int(lims[lst]), int(lims[lst + 1])
        # a chunk's scores (rows x list) and gathered rows (rows x d) stay within one tile
        step = max(1, tile**2 // max(len(ids), u.shape[1], 1))
        tasks += [(lst, q, min(hi, q + step)) for q in range(lo, hi, step) if len(ids)]
    tasks.sort(key=lambda t: (t[2] - t[1]) * len(list_ids[t[0]]), reverse=True)
    workers = workers or worker_count()
    heaps = result_heaps(n, k, workers)

    def scan(task: tuple[int, int, int], slot: int) -> None:
        lst, q0, q1 = task
        ids, rows = list_ids[lst], queries[q0:q1].astype(np.int64)
        s = u[rows] @ u[ids].T
        heaps[slot].heaps.addn_query_subset_with_ids(
            len(rows), swig_ptr(rows), len(ids), swig_ptr(s), swig_ptr(ids), 0
        )

    ticker = Ticker(progress, n, len(queries))
    with single_threaded_blas(workers):
        run_tiles(tasks, scan, workers, lambda t: ticker(t[2] - t[1]))
    return merge_heaps(heaps)


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
