"""Blockwise inner-product kNN over L2-normalised rows with FAISS: never an N x N matrix.

Exact mode runs ``faiss.knn`` (BLAS GEMM plus a heap, in tiles) one block of query rows at a
time. Approximate mode builds any FAISS index from a factory string (``IVF4096,Flat``,
``HNSW32``, ...), trains it on a seeded sample, and searches block by block with per-call search
parameters. Its neighbour sets are checked against exact kNN on a sample of rows: that recall is
what the approximation costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

EXACT = "exact"
Progress = Callable[[int], None]


class KnnConfigError(ValueError):
    """A kNN setting FAISS cannot use (bad factory string, too few rows to train, ...)."""


@dataclass(frozen=True)
class KnnSpec:
    """How to find neighbours: ``exact`` or a FAISS factory string plus its search knobs."""

    method: str = EXACT
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int | None = None
    recall_sample: int = 1000
    seed: int = 0

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


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: ``xq`` (m, d), ``xb`` (n, d) float32 -> (sims, ids) (m, k)."""
    sims, ids = faiss.knn(
        np.ascontiguousarray(xq, dtype=np.float32),
        np.ascontiguousarray(xb, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return sims, ids


def build_index(u: np.ndarray, spec: KnnSpec, block_size: int, progress: Progress | None = None):
    """A trained FAISS inner-product index over ``u`` (n, d) float32, built from ``spec.method``."""
    n, d = u.shape
    try:
        index = faiss.index_factory(d, "Flat" if spec.exact else spec.method,
                                    faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise KnnConfigError(f"FAISS cannot build index {spec.method!r}: {_first_line(exc)}") from exc
    if not index.is_trained:
        sample = _train_sample(u, index, spec)
        logger.info("training %s on %d rows", spec.method, len(sample))
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise KnnConfigError(
                f"training {spec.method!r} on {len(sample)} rows failed: {_first_line(exc)}"
            ) from exc
    for lo in range(0, n, block_size):
        index.add(np.ascontiguousarray(u[lo : lo + block_size]))
        if progress:
            progress(min(block_size, n - lo))
    return index


def search_parameters(index, nprobe: int | None, ef_search: int | None):
    """Per-call FAISS search parameters for ``index`` (never mutates the shared index)."""
    if faiss.try_extract_index_ivf(index) is not None:
        return faiss.SearchParametersIVF(nprobe=nprobe) if nprobe else None
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=ef_search) if ef_search else None
    return None


def self_knn(
    u: np.ndarray, k: int, spec: KnnSpec, block_size: int, progress: Progress | None = None
) -> KnnResult:
    """Top-``k`` neighbours of every row of ``u`` (n, d) float32 among all rows, itself included."""
    t0 = time.perf_counter()
    n = u.shape[0]
    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    index = None
    if spec.exact:
        search = lambda xq: exact_knn(xq, u, k)  # noqa: E731
    else:
        index = build_index(u, spec, block_size)
        params = search_parameters(index, spec.nprobe, spec.ef_search)
        search = lambda xq: index.search(xq, k, params=params)  # noqa: E731
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


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``min(n, size)`` distinct row numbers."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def set_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's ``truth`` ids (m, k) present in ``found`` (m, k')."""
    if truth.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


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
