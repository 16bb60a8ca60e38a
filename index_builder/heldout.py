"""Queries the way they reach the service, for measuring an index: held out from what they search.

A gallery row used as a query finds itself first, which flatters every index (measured at
200,000 x 256: IVF1024 nprobe 16 scored recall@10 0.913 with gallery rows as queries, 0.828 on
held-out queries). Here a sampled gallery row is expanded online against the rest of the gallery
(its own row removed from each level's neighbours, :func:`without_own`), and the same own row is
removed from the exact answer and from every candidate's answer (:func:`search_held_out`). With
``--quality-queries`` those separate queries are expanded instead and nothing is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.online import GalleryLevel, NeighbourSearch, expand_online, gallery_level

Search = Callable[[np.ndarray, int], np.ndarray]
"""``(xq (m, d) float32, k) -> ids (m, k)``: one index's top-k, best first."""


@dataclass(frozen=True)
class QuerySample:
    """``xq`` (m, d) float32 L2-normalised queries; ``own`` (m,) int64 rows masked from results."""

    xq: np.ndarray
    own: np.ndarray | None
    source: str


def expanded_queries(
    levels: list[Any], qe_k: int, alpha: float, rows: np.ndarray | None = None, raw: np.ndarray | None = None
) -> QuerySample:
    """Online-expanded queries over staged ``levels`` (``artifact.Level``), normalised.

    ``rows`` (m,): gallery rows held out of their own expansion and results; or ``raw`` (m, d):
    separate raw queries. Each level is searched as the service searches it (its index, if any).
    """
    base = [gallery_level(lv.rows, lv.norms, lv.index, lv.entry.nprobe, lv.entry.ef_search) for lv in levels]
    if rows is not None:
        first = levels[0]
        raw = np.asarray(first.rows[rows], dtype=np.float32) * np.asarray(first.norms[rows])[:, None]
        base = [GalleryLevel(lv.rows, lv.norms, without_own(lv.search, rows)) for lv in base]
    if raw is None:
        raise ValueError("expanded_queries needs rows or raw queries")
    xq = aqe.normalize_rows(expand_online(raw, base, qe_k, alpha))[0]
    source = "held-out gallery rows" if rows is not None else "quality queries"
    return QuerySample(np.ascontiguousarray(xq, dtype=np.float32), rows, source)


def without_own(search: NeighbourSearch, own: np.ndarray) -> NeighbourSearch:
    """``search`` for the queries of rows ``own`` (in order), each query's own row removed."""

    def held_out(u: np.ndarray, k: int) -> np.ndarray:
        return drop_own(search(u, k + 1), own, k)

    return held_out


def search_held_out(search: Search, queries: QuerySample, k: int) -> np.ndarray:
    """Top-``k`` ids (m, k) of ``queries`` through ``search``, each query's own row removed."""
    if queries.own is None:
        return search(queries.xq, k)
    return drop_own(search(queries.xq, k + 1), queries.own, k)


def drop_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """``ids`` (m, k + 1) without each row's ``own`` id (or, absent, its last column) -> (m, k)."""
    drop = ids == own[:, None]
    drop[~drop.any(axis=1), -1] = True
    drop &= np.cumsum(drop, axis=1) == 1  # exactly one column per row
    return ids[~drop].reshape(len(ids), k)
