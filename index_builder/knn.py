"""Blockwise inner-product kNN over L2-normalised rows with FAISS: never an N x N matrix.

Three routes to every row's top-k among all rows (itself included), results best first:

* **exact, symmetric** (``exact_kernel="symmetric"``, the default from ``SYMMETRIC_MIN_N`` rows):
  one GEMM per tile pair feeds both sides' top-k, half the flops of a full scan
  (``index_builder.symmetric``).
* **exact, faiss** (``exact_kernel="faiss"``): ``faiss.knn`` for one block of rows at a time
  against all rows; cheaper below ``SYMMETRIC_MIN_N`` rows.
* **approximate**: any FAISS factory string, trained on a seeded sample and searched block by block
  with per-call parameters; or, for ``IVF<nlist>,Flat`` with ``batch_lists=True``, batch search
  over the inverted lists (``index_builder.ivf_batch``). Its neighbour sets are checked against
  exact kNN on a sample of rows: that recall is what the approximation costs.

The tiled routes run on the worker pool of ``index_builder.pool``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from aqe_retrieval.errors import KnnConfigError
from aqe_retrieval.faiss_search import exact_knn, search_parameters
from index_builder.ivf_batch import batch_list_search, batch_self_knn
from index_builder.ondisk import OnDiskLists, fill_ondisk
from index_builder.pool import Progress
from index_builder.storage import ArrayStore
from index_builder.symmetric import SYMMETRIC_TILE, symmetric_self_knn

logger = logging.getLogger(__name__)

EXACT = "exact"
AUTO = "auto"
GRAPH_RECALL_TARGET = 0.95
"""The graph recall (top-qe_k sets against exact kNN, on a sample) a graph is expected to reach."""
EXACT_KERNELS = ("auto", "symmetric", "faiss")
SYMMETRIC_MIN_N = 4096
"""``auto`` uses the symmetric kernel from this many rows on. Measured (bench_knn.py --sweep, d = 512,
2 cores, 2026-11-30): against faiss.knn 0.51x at 1,000 rows, 0.79x at 2,000, 1.01x at 4,000,
1.51x at 8,000 and 1.81x at 100,000."""


@dataclass(frozen=True)
class KnnSpec:
    """How to find neighbours: ``exact`` or a FAISS factory string plus its search knobs.

    ``method="auto"`` is resolved by :mod:`index_builder.graph_auto` (exact or a tuned IVF graph).
    ``exact_kernel``: ``auto`` | ``symmetric`` | ``faiss`` (exact mode). ``batch_lists``: search an
    ``IVF<nlist>,Flat`` index list by list (one GEMM per inverted list) instead of row by row;
    ``None`` (default): wherever that gives the same neighbours, i.e. for ``IVF<nlist>,Flat``.
    ``recall_target``: the graph recall below which a graph is reported as below target.
    """

    method: str = EXACT
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int | None = None
    recall_sample: int = 1000
    seed: int = 0
    exact_kernel: str = "auto"
    batch_lists: bool | None = None
    recall_target: float = GRAPH_RECALL_TARGET

    def __post_init__(self) -> None:
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.exact_kernel not in EXACT_KERNELS:
            raise ValueError(f"exact_kernel must be one of {EXACT_KERNELS}, got {self.exact_kernel!r}")
        if self.batch_lists and self.exact:
            raise ValueError("batch_lists needs an IVF index (e.g. method='IVF4096,Flat'), not exact")

    @property
    def exact(self) -> bool:
        """Whether ``method`` is exact (flat) search."""
        return self.method.lower() in (EXACT, "flat")


@dataclass(frozen=True)
class KnnMemory:
    """How one kNN phase stays inside its memory budget (``index_builder.budget``).

    ``tile``: tile side of the tiled kernels; ``stripe``: heap rows held at a time (None: all);
    ``lists``: put an IVF index's inverted lists on disk there; ``store``: where the graph
    (``<graph>_ids``, ``<graph>_sims``) and the coarse assignment are allocated.
    """

    tile: int = SYMMETRIC_TILE
    stripe: int | None = None
    lists: OnDiskLists | None = None
    store: ArrayStore | None = None
    graph: str = "graph"


@dataclass(frozen=True)
class KnnResult:
    """Top-k neighbours of every row: ``ids`` (n, k) int64, ``sims`` (n, k) float32, best first.

    ``spec``: what was run (``auto`` resolved); ``tried``: what ``auto`` measured on the way.
    """

    ids: np.ndarray
    sims: np.ndarray
    recall: float | None
    recall_sample: int
    seconds: float
    index: Any = None
    spec: KnnSpec | None = None
    tried: tuple[dict[str, Any], ...] = ()


def build_index(
    u: np.ndarray,
    spec: KnnSpec,
    block_size: int,
    progress: Progress | None = None,
    add: bool = True,
    lists: OnDiskLists | None = None,
) -> Any:
    """A trained FAISS inner-product index over ``u`` (n, d) float32, built from ``spec.method``.

    With ``add=False`` the index is trained but left empty. With ``lists``, an IVF index's
    inverted lists are built on disk there (:func:`~index_builder.ondisk.fill_ondisk`).
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
    if add and lists is not None and faiss.try_extract_index_ivf(index) is not None:
        fill_ondisk(index, u, lists, progress=progress)
        return index
    for lo in range(0, n if add else 0, block_size):
        index.add(np.ascontiguousarray(u[lo : lo + block_size]))
        if progress:
            progress(min(block_size, n - lo))
    return index


def self_knn(
    u: np.ndarray,
    k: int,
    spec: KnnSpec,
    block_size: int,
    progress: Progress | None = None,
    workers: int | None = None,
    index: Any = None,
    memory: KnnMemory | None = None,
) -> KnnResult:
    """Top-``k`` neighbours of every row of ``u`` (n, d) float32 among all rows, itself included.

    ``workers``: threads of the tiled routes (default :func:`~index_builder.pool.worker_count`).
    ``index``: an index built from ``spec.method`` over ``u`` (trained and filled), searched
    instead of building one.
    ``memory``: tile, heap stripe, on-disk lists and where the graph lives (default: all in RAM).
    """
    t0 = time.perf_counter()
    memory = memory or KnnMemory()
    u = np.ascontiguousarray(u, dtype=np.float32)
    n = u.shape[0]
    store = memory.store or ArrayStore()
    symmetric = spec.exact and use_symmetric(n, spec.exact_kernel)
    batch = not symmetric and use_batch_lists(spec, u.shape[1])
    # the graph: written by stripes or blocks into the store's arrays (memmaps out of core); the
    # tiled kernels' own heaps are the result when they hold every row at once
    by_rows = (memory.stripe is not None and memory.stripe < n) or not (symmetric or batch)
    out = None
    if by_rows:
        out = (
            store.empty(f"{memory.graph}_sims", (n, k), np.float32),
            store.empty(f"{memory.graph}_ids", (n, k), np.int64),
        )
    if symmetric:
        tile = min(block_size, memory.tile)
        sims, ids = symmetric_self_knn(u, k, tile, progress, workers, memory.stripe, out)
    elif batch:
        if index is None:
            index = build_index(u, spec, block_size, add=False)
            sims, ids = batch_self_knn(
                index,
                u,
                k,
                spec.nprobe,
                block_size,
                progress,
                workers=workers,
                tile=memory.tile,
                stripe=memory.stripe,
                lists=memory.lists,
                store=memory.store,
                out=out,
            )
        else:
            sims, ids = batch_list_search(
                index,
                u,
                k,
                spec.nprobe,
                block_size,
                progress,
                workers=workers,
                tile=memory.tile,
                stripe=memory.stripe,
                out=out,
            )
    else:
        if spec.exact:
            search = lambda xq: exact_knn(xq, u, k)  # noqa: E731
        else:
            index = index if index is not None else build_index(u, spec, block_size, lists=memory.lists)
            params = search_parameters(index, spec.nprobe, spec.ef_search)
            search = lambda xq: index.search(xq, k, params=params)  # noqa: E731
        assert out is not None
        sims, ids = out
        for lo in range(0, n, block_size):
            hi = min(n, lo + block_size)
            sims[lo:hi], ids[lo:hi] = search(np.ascontiguousarray(u[lo:hi]))
            if progress:
                progress(hi - lo)
    rows = short_rows(ids, block_size)
    if len(rows):
        # An approximate index can return fewer than k hits (empty inverted lists): fall back to
        # exact search for those rows rather than averaging padding.
        logger.warning("%d rows got fewer than %d neighbours; searched exactly", len(rows), k)
        sims[rows], ids[rows] = exact_knn(u[rows], u, k)
    recall, sample = (None, 0)
    if not spec.exact:
        rows = sample_rows(n, spec.recall_sample, spec.seed)
        recall, sample = set_recall(ids[rows], exact_knn(u[rows], u, k)[1]), len(rows)
    return KnnResult(ids, sims, recall, sample, time.perf_counter() - t0, index, spec)


def use_batch_lists(spec: KnnSpec, d: int) -> bool:
    """Whether ``spec`` searches list by list: asked, or by default for ``IVF<nlist>,Flat``.

    Raises :class:`KnnConfigError` when asked for an index that is not ``IVF<nlist>,Flat``.
    """
    if spec.exact or spec.batch_lists is False:
        return False
    ivf_flat = isinstance(faiss.downcast_index(_factory(d, spec)), faiss.IndexIVFFlat)
    if spec.batch_lists and not ivf_flat:
        raise KnnConfigError(f"batch_lists needs an 'IVF<nlist>,Flat' index, got {spec.method!r}")
    return ivf_flat


def short_rows(ids: np.ndarray, block_size: int) -> np.ndarray:
    """Rows of ``ids`` (n, k) with a ``-1`` (fewer than k hits), read block by block."""
    found = [
        lo + np.flatnonzero((ids[lo : lo + block_size] < 0).any(axis=1))
        for lo in range(0, len(ids), block_size)
    ]
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class IndexSize:
    """What an index built from a factory string holds: bytes, and whether it can go out of core."""

    bytes: int
    in_memory_only: str | None
    nlist: int = 0
    code_size: int = 0
    train_rows: int = 0


def ivf_train_rows(nlist: int, train_size: int | None = None) -> int:
    """Rows an IVF index with ``nlist`` lists trains on: ``train_size``, else ``max(50 nlist, 10000)``."""
    return train_size if train_size is not None else max(50 * nlist, 10_000)


def index_size(method: str, n: int, d: int, train_size: int | None = None, extra: int = 8) -> IndexSize:
    """Size of ``method`` (a factory string or ``exact``) over n rows of dimension d.

    IVF indexes can put their lists on disk (``N (code_size + extra)`` bytes, ``extra`` the id
    and any direct map); flat and graph indexes (HNSW, ...) hold everything in memory.
    """
    if method.lower() in (EXACT, "flat"):
        return IndexSize(4 * n * d, "a flat index holds every row")
    index = _factory(d, KnnSpec(method=method))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return IndexSize(n * (4 * d + 128), f"{method} keeps its vectors and links in memory")
    rows = ivf_train_rows(ivf.nlist, train_size)
    return IndexSize(n * (ivf.code_size + extra), None, ivf.nlist, ivf.code_size, min(n, rows))


def use_symmetric(n: int, exact_kernel: str = "auto") -> bool:
    """Whether exact kNN over ``n`` rows runs the symmetric kernel (``auto``: from SYMMETRIC_MIN_N)."""
    return exact_kernel == "symmetric" or (exact_kernel == "auto" and n >= SYMMETRIC_MIN_N)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``min(n, size)`` distinct row numbers."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def set_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's ``truth`` ids (m, k) present in ``found`` (m, k')."""
    if truth.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def _factory(d: int, spec: KnnSpec) -> Any:
    try:
        return faiss.index_factory(d, "Flat" if spec.exact else spec.method, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise KnnConfigError(f"FAISS cannot build index {spec.method!r}: {_first_line(exc)}") from exc


def _train_sample(u: np.ndarray, index: Any, spec: KnnSpec) -> np.ndarray:
    n = u.shape[0]
    size = spec.train_size
    if size is None:
        ivf = faiss.try_extract_index_ivf(index)
        size = ivf_train_rows(ivf.nlist) if ivf is not None else 100_000
    return np.ascontiguousarray(u[sample_rows(n, size, spec.seed)])


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
