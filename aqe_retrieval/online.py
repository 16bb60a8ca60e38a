"""Serving-mode query expansion: a raw query expanded against the stored gallery levels.

The contract (``docs/AQE.md``, serving mode): round t expands the query against level t - 1 of
the gallery: the query itself (weight 1) plus its top ``qe_k - 1`` rows of that level,
``q <- (q + sum_j s_j ** alpha * G_j) / qe_k`` with ``G_j`` raw rows (``norm_j * row_j``) and
``s_j`` exact cosines. For one query this equals the reference's row for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.faiss_search import search_parameters, serving_knn

NeighbourSearch = Callable[[np.ndarray, int], np.ndarray]
"""``(u (q, d) normalised queries, k) -> ids (q, k)``: a level's top-k gallery rows."""


@dataclass(frozen=True)
class GalleryLevel:
    """One level of the gallery as online expansion needs it: rows, norms, a neighbour search."""

    rows: np.ndarray
    norms: np.ndarray
    search: NeighbourSearch


def gallery_level(
    rows: np.ndarray,
    norms: np.ndarray,
    index: Any = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> GalleryLevel:
    """A :class:`GalleryLevel` searched exactly, or through ``index`` with per-call parameters.

    Exactly is :func:`~aqe_retrieval.faiss_search.serving_knn`: a numpy GEMV for one query
    (measured 2.2x faster than FAISS's flat kNN at 200,000 x 256), FAISS for larger batches.
    """
    if index is None:
        return GalleryLevel(rows, norms, lambda u, k: serving_knn(u, rows, k)[1])
    params = search_parameters(index, nprobe, ef_search)

    def search(u: np.ndarray, k: int) -> np.ndarray:
        ids = index.search(u, k, params=params)[1]
        if (ids < 0).any():  # an approximate index came back short: answer exactly
            ids = serving_knn(u, rows, k)[1]
        return ids

    return GalleryLevel(rows, norms, search)


def expand_online(queries: np.ndarray, levels: list[GalleryLevel], qe_k: int, alpha: float) -> np.ndarray:
    """Serving-mode AQE of raw queries (q, d) -> (q, d) float32, un-normalised (``docs/AQE.md``).

    Round t expands against level t - 1: the query itself (weight 1) plus its top ``qe_k - 1``
    rows of that level, ``q <- (q + sum_j s_j ** alpha * G_j) / qe_k`` with ``G_j`` raw rows
    (``norm_j * row_j``) and ``s_j`` exact cosines.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = qe_k - 1
    for level in levels:
        u, _ = aqe.normalize_rows(q)
        if k == 0:
            q = aqe.expand_queries(
                q,
                np.empty((len(q), 0, q.shape[1]), np.float32),
                np.empty((len(q), 0), np.float32),
                alpha,
                qe_k,
            )
            continue
        ids = level.search(u, k).ravel()
        nb_u = np.asarray(level.rows[ids], dtype=np.float32).reshape(len(q), k, q.shape[1])
        sims = np.einsum("qkd,qd->qk", nb_u, u)
        raw = nb_u * np.asarray(level.norms[ids]).reshape(len(q), k, 1)
        q = aqe.expand_queries(q, raw, sims, alpha, qe_k)
    return q
