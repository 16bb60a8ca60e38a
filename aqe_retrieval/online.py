"""Serving-mode query expansion: a raw query expanded against the stored gallery levels.

The contract (``docs/AQE.md``, serving mode): round t expands the query against level t - 1 of
the gallery: the query itself (weight 1) plus its top ``qe_k - 1`` rows of that level,
``q <- (q + sum_j s_j ** alpha * G_j) / qe_k`` with ``G_j`` raw rows (``norm_j * row_j``) and
``s_j`` exact cosines. For one query this equals the reference's row for it. Levels may be
stored as float16: a query's ``qe_k - 1`` neighbour rows are read from the mapped level and
converted to float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.faiss_search import (
    exact_knn_blocks,
    has_ondisk_lists,
    search_by_lists,
    search_parameters,
    serving_knn,
)
from aqe_retrieval.overlay import DeltaIndex

BY_LISTS_MIN = 32
"""From this many queries at once, a level index with on-disk lists is searched list by list."""
NeighbourSearch = Callable[[np.ndarray, int], np.ndarray]
"""``(u (q, d) normalised queries, k) -> ids (q, k)``: a level's top-k gallery rows."""


@dataclass(frozen=True)
class GalleryLevel:
    """One level of the gallery as online expansion needs it: rows, norms, a neighbour search."""

    rows: np.ndarray
    norms: np.ndarray
    search: NeighbourSearch


def exact_rows(u: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows (q, k) of a level for normalised queries ``u`` (q, d).

    float32 rows: :func:`~aqe_retrieval.faiss_search.serving_knn` (a numpy GEMV for one query,
    measured 2.2x faster than FAISS's flat kNN at 200,000 x 256; FAISS for larger batches);
    float16 rows: converted a block at a time (:func:`~aqe_retrieval.faiss_search.exact_knn_blocks`),
    never the whole level at once.
    """
    if rows.dtype == np.float32:
        return serving_knn(u, rows, k)[1]
    return exact_knn_blocks(u, rows, k)[1]


def gallery_level(
    rows: np.ndarray,
    norms: np.ndarray,
    index: Any = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> GalleryLevel:
    """A :class:`GalleryLevel` searched exactly, or through ``index`` with per-call parameters.

    ``rows`` (n, d) float32 or float16 (a memmap: a query reads only its neighbours' rows). Exactly
    is :func:`exact_rows`. ``index`` may be a delta version's
    :class:`~aqe_retrieval.overlay.DeltaIndex` (its own nprobe/efSearch; with on-disk lists it
    is searched per query, not list by list: the stale mask travels as a selector). A memmap is
    kept as a plain ndarray view of the same mapping: indexing a ``np.memmap`` builds a memmap
    object per result, measured at 4.7 against 3.3 us a query's neighbour rows (200,000 x 256).
    """
    rows, norms = _plain(rows), _plain(norms)
    if index is None:
        return GalleryLevel(rows, norms, lambda u, k: exact_rows(u, rows, k))
    if isinstance(index, DeltaIndex):  # a delta version: the base index masked, plus the delta rows

        def search_delta(u: np.ndarray, k: int) -> np.ndarray:
            ids = index.search(u, k)[1]
            return exact_rows(u, rows, k) if (ids < 0).any() else ids

        return GalleryLevel(rows, norms, search_delta)
    params = search_parameters(index, nprobe, ef_search)
    ondisk = has_ondisk_lists(index)

    def search(u: np.ndarray, k: int) -> np.ndarray:
        if ondisk and len(u) >= BY_LISTS_MIN:  # read each probed list once for the whole batch
            ids = search_by_lists(index, u, k, nprobe)[1]
        else:
            ids = index.search(u, k, params=params)[1]
        if (ids < 0).any():  # an approximate index came back short: answer exactly
            ids = exact_rows(u, rows, k)
        return ids

    return GalleryLevel(rows, norms, search)


def _plain(a: np.ndarray) -> np.ndarray:
    """``a`` as a base-class ndarray over the same memory (a memmap's mapping stays its base)."""
    return a.view(np.ndarray) if isinstance(a, np.memmap) else a


def expand_online(queries: np.ndarray, levels: list[GalleryLevel], qe_k: int, alpha: float) -> np.ndarray:
    """Serving-mode AQE of raw queries (q, d) -> (q, d) float32, un-normalised (``docs/AQE.md``).

    Round t expands against level t - 1: the query itself (weight 1) plus its top ``qe_k - 1``
    rows of that level, ``q <- (q + sum_j s_j ** alpha * G_j) / qe_k`` with ``G_j`` raw rows
    (``norm_j * row_j``) and ``s_j`` exact cosines.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if len(q) == 1 and qe_k > 1:
        return expand_one(q[0], levels, qe_k, alpha)[None, :]
    return expand_batch(q, levels, qe_k, alpha)


def expand_batch(q: np.ndarray, levels: list[GalleryLevel], qe_k: int, alpha: float) -> np.ndarray:
    """:func:`expand_online` of a (q, d) float32 batch, one search per level for all its rows."""
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


def expand_one(query: np.ndarray, levels: list[GalleryLevel], qe_k: int, alpha: float) -> np.ndarray:
    """:func:`expand_online` of one raw query (d,) float32 -> (d,) float32, in fewer numpy calls.

    A single query is what most requests send, and the batch path's 3-D reshapes, einsum and
    ``(q, k, d)`` temporaries cost a few microseconds each (about 30 calls a level). Here the
    level's norms fold into the weights (``sum_j (w_j n_j) row_j``, against the batch path's
    ``sum_j w_j (n_j row_j)``: equal up to float32 rounding; tests/test_online.py compares
    the two). ``qe_k >= 2``.
    """
    x = query
    k = qe_k - 1
    for level in levels:
        norm = math.sqrt(float(np.dot(x, x)))  # a float32 sum (normalize_rows: float64)
        u = x / np.float32(max(norm, aqe.NORM_EPS))
        ids = level.search(u[None, :], k)[0]
        nb = level.rows[ids]
        if nb.dtype != np.float32:
            nb = nb.astype(np.float32)
        w = aqe.aqe_weights(nb @ u, alpha) * level.norms[ids]
        x = (x + w @ nb) / np.float32(qe_k)
    return x
