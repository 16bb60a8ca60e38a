"""Per-call FAISS search: exact inner-product kNN and search parameters that never touch the index.

A shared index is never mutated per request (``index.nprobe = ...`` races under concurrency):
parameters and id selectors travel with each ``search`` call.
"""

from __future__ import annotations

import itertools
from typing import Any

import faiss
import numpy as np

_faiss: Any = faiss
"""faiss, untyped: the wheel's stubs mistype the SWIG overloads (keyword parameters, selectors)."""


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: ``xq`` (m, d), ``xb`` (n, d) float32 -> (sims, ids) (m, k)."""
    sims, ids = faiss.knn(
        np.ascontiguousarray(xq, dtype=np.float32),
        np.ascontiguousarray(xb, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return sims, ids


EXACT_BLOCK = 65536
"""Rows of a non-float32 gallery converted at a time by :func:`exact_knn_blocks`."""


def exact_knn_blocks(
    xq: np.ndarray, xb: np.ndarray, k: int, block: int = EXACT_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_knn` over ``xb`` of any float dtype (a float16 memmap, say), block by block.

    A float32 ``xb`` is searched in one call (FAISS reads it in place); any other is converted
    ``block`` rows at a time and the results merged, so the whole gallery is never copied.
    """
    if xb.dtype == np.float32:
        return exact_knn(xq, xb, k)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    heap = faiss.ResultHeap(len(xq), k, keep_max=True)
    for lo in range(0, xb.shape[0], block):
        part = np.ascontiguousarray(xb[lo : lo + block], dtype=np.float32)
        sims, ids = exact_knn(xq, part, min(k, len(part)))
        heap.add_result(sims, np.where(ids >= 0, ids + lo, -1))
    heap.finalize()
    return heap.D, heap.I


def search_by_lists(index: Any, xq: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(xq, k)`` at ``nprobe`` for an inner-product IVF index, one list at a time.

    Each probed list is read once for all the queries that probe it (``search_preassigned``),
    instead of once per query: with on-disk lists larger than the page cache, the per-query
    scan re-reads every list from disk (measured: 200 s for 1,000 recall queries at nprobe 8
    over 104,000 x 256 under a 96 MiB cgroup). Same candidates, so the same results (ties
    apart). Indexes wrapped in a transform are searched the ordinary way.
    """
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return index.search(xq, k, params=search_parameters(index, nprobe, None))
    ivf: Any = faiss.downcast_index(index)  # untyped: the stubs mistype the numpy wrappers
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    probes = min(nprobe or ivf.nprobe, ivf.nlist)
    centroid_sims, assign = ivf.quantizer.search(xq, probes)
    heap = faiss.ResultHeap(len(xq), k, keep_max=True)
    rows, slots = np.nonzero(assign >= 0)
    lists = assign[rows, slots]
    order = np.argsort(lists, kind="stable")
    rows, slots, lists = rows[order], slots[order], lists[order]
    bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
    for lo, hi in itertools.pairwise(bounds):
        qs = rows[lo:hi]
        sims, ids = ivf.search_preassigned(
            xq[qs], k, assign[qs, slots[lo:hi]][:, None], centroid_sims[qs, slots[lo:hi]][:, None]
        )
        heap.add_result_subset(qs, sims, ids)
    heap.finalize()
    return heap.D, heap.I


def has_ondisk_lists(index: Any) -> bool:
    """Whether ``index`` is an IVF index whose inverted lists are on disk (``.ivfdata``)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(
        _faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists
    )


def search_parameters(index: Any, nprobe: int | None, ef_search: int | None) -> Any:
    """Per-call FAISS search parameters for ``index`` (never mutates the shared index)."""
    if faiss.try_extract_index_ivf(index) is not None:
        return _faiss.SearchParametersIVF(nprobe=nprobe) if nprobe else None
    if isinstance(index, faiss.IndexHNSW):
        return _faiss.SearchParametersHNSW(efSearch=ef_search) if ef_search else None
    return None


def parameters_with_selector(index: Any, sel: Any, nprobe: int | None, ef_search: int | None) -> Any:
    """Per-call parameters for ``index`` restricted to the ids that ``sel`` (an IDSelector) admits."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return _faiss.SearchParametersIVF(sel=sel, nprobe=nprobe or ivf.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return _faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search or index.hnsw.efSearch)
    return _faiss.SearchParameters(sel=sel)


def bitmap_selector(mask: np.ndarray) -> Any:
    """An IDSelector admitting the rows where ``mask`` (n,) bool is true."""
    return _faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))


BLAS_BLOCK_ROWS = 16384
"""Gallery rows scored per GEMM in :func:`blas_knn`: peak memory ``8 * m * BLAS_BLOCK_ROWS`` bytes.

Measured (200,000 x 256, one thread, benchmarks/bench_vs_chroma.py's notes): blocks of 4,096,
16,384 and 65,536 rows cost within 10 % of each other at 1 query; 16,384 was the fastest at 2-32.
"""


def blas_knn(
    xq: np.ndarray, xb: np.ndarray, k: int, mask: np.ndarray | None = None, block_rows: int = BLAS_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product for a few queries: numpy GEMM (GEMV for one) per block of rows.

    ``xq`` (m, d), ``xb`` (n, d) float32 (memory-mapped is fine: read block by block) ->
    (sims, ids) (m, min(k, n)), best first; ``mask`` (n,) bool keeps only the rows where it is
    true (ids ``-1``, sims ``-inf`` where fewer than k are kept). Each block's scores go into
    FAISS's C++ heaps (``float_minheap_array_t.addn``, as ``faiss.contrib``'s ``ResultHeap``),
    which reject most scores with one comparison; ``np.argpartition`` cost several times the
    GEMM at 32 queries (benchmarks/bench_vs_chroma.py notes the measurement).
    """
    q = np.ascontiguousarray(xq, dtype=np.float32)
    m, n = len(q), len(xb)
    k = min(k, n)
    sims = np.empty((m, k), np.float32)
    ids = np.empty((m, k), np.int64)
    heaps = _faiss.float_minheap_array_t()  # a min-heap per query keeps its k largest
    heaps.nh, heaps.k = m, k
    heaps.val, heaps.ids = faiss.swig_ptr(sims), faiss.swig_ptr(ids)
    heaps.heapify()
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        # rows @ q.T, not q @ rows.T: OpenBLAS then packs the small operand, not the block
        # (measured 1.3-1.8x faster at 2-32 queries; the same GEMV at one)
        s = np.ascontiguousarray((np.asarray(xb[lo:hi]) @ q.T).T)  # (m, hi - lo)
        if mask is not None:
            s[:, ~mask[lo:hi]] = -np.inf
        heaps.addn(hi - lo, faiss.swig_ptr(s), lo, 0, m)
    heaps.reorder()
    sims[ids < 0] = -np.inf
    return sims, ids


BLAS_MAX_QUERIES = 4
"""Batches up to this size go to :func:`blas_knn`; larger ones to FAISS's flat kNN.

Measured, 200,000 x 256, one thread, best of 9 (load average 3 on 2 cores): 1 query 18.7 ms
against FAISS's 41.4 ms (a GEMV at memory bandwidth); 2: 36.3 / 41.4; 4: 39.2 / 42.4; 8: 52.3 /
44.3. FAISS 1.15's ``IndexFlatIP`` ignores ``distance_compute_blas_threshold`` here (1 and 20
measured the same), so no process-wide FAISS setting is changed.
"""


def serving_knn(
    xq: np.ndarray, xb: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k for serving: :func:`blas_knn` for a few queries or a mask, else :func:`exact_knn`.

    Unaligned rows (see :func:`flat_rows`) go to FAISS whatever the batch (a mask: over a copy
    of the rows it keeps).
    """
    if xb.flags.aligned and (mask is not None or len(xq) <= BLAS_MAX_QUERIES):
        return blas_knn(xq, xb, k, mask)
    if mask is None:
        return exact_knn(xq, xb, min(k, len(xb)))
    rows = np.flatnonzero(mask)
    sims, local = exact_knn(xq, xb[rows], min(k, len(rows)))
    return sims, np.where(local >= 0, rows[np.maximum(local, 0)], -1)


def flat_rows(index: Any, copy_unaligned: bool = False) -> np.ndarray | None:
    """The rows of an inner-product ``IndexFlat`` as an (n, d) float32 view (no copy), else None.

    The view lives as long as the index does (its codes, memory-mapped or not). The codes of a
    memory-mapped ``.faiss`` file are often not 4-byte aligned (they start where the header
    ends), and numpy skips BLAS for unaligned arrays (a loop of its own, measured 12x slower
    than FAISS on the same rows): such rows give None, or with ``copy_unaligned`` an aligned
    private copy (n * d * 4 bytes, not shared between processes).
    """
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if index.ntotal == 0:
        return None
    flat = np.asarray(faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d))
    flat = flat.reshape(index.ntotal, index.d)
    if flat.flags.aligned:
        return flat
    return np.array(flat) if copy_unaligned else None
