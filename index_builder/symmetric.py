"""The symmetric exact kNN kernel: every row's top-k among all rows from half the GEMMs.

``S = U U^T`` is symmetric, so each tile pair (a, b >= a) is one GEMM, and its values feed the
top-k of both sides: the rows of block a (a ``faiss.ResultHeap`` insertion) and the rows of block
b (the tile's columns, filtered by those rows' current k-th best value first, so the transposed
tile is never copied). Half the flops of a full scan; similarities are the GEMM's own values.
Extra memory: ``workers * 5 * SYMMETRIC_TILE**2`` bytes of tiles (more only while ``k`` is
comparable to the tile) plus the per-worker heaps (``index_builder.pool``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faiss import swig_ptr

from index_builder.pool import (
    Progress,
    Ticker,
    merge_heaps,
    result_heaps,
    run_tiles,
    single_threaded_blas,
    worker_count,
)

SYMMETRIC_TILE = 2048
"""Tile side of the symmetric kernel (capped by the block size): a 16 MiB float32 tile. Measured at
N = 40,000, d = 512 (bench_knn.py --tiles, best of 2): 4.73 s (1024), 4.52 s (1536), 4.76 s (2048),
5.02 s (4096): flat from 1024 to 2048; 2048 reached 0.875 of the GEMM peak at N = 100,000."""


def symmetric_self_knn(
    u: np.ndarray,
    k: int,
    tile: int = SYMMETRIC_TILE,
    progress: Progress | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``u`` (n, d) float32 against itself: (sims, ids) (n, k), best first.

    Diagonal tiles first (each fills only its own rows' heaps, so they run in parallel on one
    heap); their k-th best values then serve as a floor that keeps the column side sparse.
    ``workers``: tile threads (default :func:`~index_builder.pool.worker_count`).
    """
    n = u.shape[0]
    starts = range(0, n, tile)
    diagonal = [(a, a) for a in starts]
    off = [(a, b) for a in starts for b in starts if b > a]
    workers = workers or worker_count()
    heaps = result_heaps(n, k, workers)
    result = heaps[0]
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

    def cells(task: tuple[int, int]) -> int:
        return min(tile, n - task[0]) * min(tile, n - task[1])

    ticker = Ticker(progress, n, sum(cells(t) for t in diagonal + off))
    with single_threaded_blas(workers):
        run_tiles(diagonal, diagonal_tile, workers, lambda t: ticker(cells(t)))
        floor = result.D[:, 0].copy()
        run_tiles(off, off_tile, workers, lambda t: ticker(cells(t)))
    return merge_heaps(heaps)


def add_columns(heap: Any, s: np.ndarray, a0: int, b0: int, bound: np.ndarray) -> None:
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
    # one value per entry, rows repeated: safe because tile workers run FAISS serially (run_tiles)
    heap.heaps.addn_query_subset_with_ids(
        values.size, swig_ptr(subset), 1, swig_ptr(values), swig_ptr(ids), 1
    )
