"""The searcher: one loaded index version, online query expansion, filtered top-k search.

A :class:`Searcher` is immutable once built; the service swaps whole searchers on reload, so a
request that took one keeps using it to the end. Search parameters (nprobe, efSearch, id
selectors) are passed per call, never set on the shared index.

Online expansion follows ``docs/AQE.md`` (serving mode): for level t = 0 .. qe_times - 1 the
query's neighbours are itself (weight 1) and its top ``qe_k - 1`` rows of the level-t gallery,
``q <- (q + sum_j s_j ** alpha * G_j) / qe_k``; then ``normalise(q)`` is searched in the serving
index over the expanded gallery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.artifact import Artifact
from aqe_retrieval.errors import QueryError
from aqe_retrieval.faiss_search import (
    bitmap_selector,
    exact_knn,
    parameters_with_selector,
    search_parameters,
)
from aqe_retrieval.filters import filter_mask
from aqe_retrieval.online import expand_online, gallery_level

logger = logging.getLogger(__name__)


MAX_ABS_VALUE = 1e30


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


class Searcher:
    """Searches one loaded artifact version; safe to share between threads."""

    def __init__(self, art: Artifact) -> None:
        self.artifact = art
        self.manifest = art.manifest
        self.version = art.manifest.version
        self.loaded_at = time.time()
        self.n, self.d = art.manifest.n, art.manifest.d
        self.qe_k = art.manifest.effective_qe_k
        self.alpha = art.manifest.alpha
        s = art.manifest.serving_index
        self._serving_params = (s.nprobe, s.ef_search)
        self._ivf = faiss.try_extract_index_ivf(art.serving_index)
        self._levels = [
            gallery_level(lv.rows, lv.norms, lv.index, lv.entry.nprobe, lv.entry.ef_search)
            for lv in art.levels
        ]

    def expand(self, queries: np.ndarray) -> np.ndarray:
        """Online AQE of raw queries (q, d) float32 -> expanded (q, d) float32, un-normalised."""
        return expand_online(queries, self._levels, self.qe_k, self.alpha)

    def search(
        self, queries: np.ndarray, k: int, expand: bool = True, filters: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` gallery rows for each raw query (q, d); best first, never padding."""
        return self.search_checked(self.check_queries(queries), k, expand, filters)

    def search_checked(
        self, q: np.ndarray, k: int, expand: bool = True, filters: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """:meth:`search` of queries that :meth:`check_queries` has already passed."""
        if k < 1:
            raise QueryError(f"k must be >= 1, got {k}")
        xq = self.expand(q) if expand else q
        u, _ = aqe.normalize_rows(xq)
        mask = filter_mask(filters, self.artifact.metadata) if filters else None
        sims, ids = self._serving_search(u, min(k, self.n), mask)
        return [
            [Hit(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(sims, ids, strict=True)
        ]

    def _serving_search(
        self, u: np.ndarray, k: int, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        index = self.artifact.serving_index
        nprobe, ef = self._serving_params
        if mask is None:
            return index.search(u, k, params=search_parameters(index, nprobe, ef))
        allowed = int(mask.sum())
        if allowed == 0:
            return np.empty((len(u), 0), np.float32), np.empty((len(u), 0), np.int64)
        want = min(k, allowed)
        sel = bitmap_selector(mask)
        sims, ids = index.search(u, want, params=parameters_with_selector(index, sel, nprobe, ef))
        if (ids < 0).any() and self._ivf is not None:
            # A selective filter can empty the probed lists: probe them all before giving up.
            everything = parameters_with_selector(index, sel, self._ivf.nlist, ef)
            sims, ids = index.search(u, want, params=everything)
        if (ids < 0).any():
            sims, ids = self._exact_subset(u, want, np.flatnonzero(mask))
        return sims, ids

    def _exact_subset(self, u: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.artifact.serving_index.reconstruct_batch(rows)
        sims, local = exact_knn(u, vectors, k)
        return sims, np.where(local >= 0, rows[np.maximum(local, 0)], -1)

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        """Validate a (q, d) batch: right dimension, finite, within +-1e30, not all zero.

        One pass over the values (each row's largest magnitude: NaN if it holds a NaN) before
        narrowing to float32, so values that would overflow float32 are caught.
        """
        raw = np.asarray(queries)
        if raw.ndim != 2 or raw.shape[0] == 0:
            raise QueryError("send at least one query embedding")
        if raw.shape[1] != self.d:
            raise QueryError(f"embedding dimension {raw.shape[1]} does not match the index's {self.d}")
        if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
            raise QueryError(f"embeddings must be real numbers, got {raw.dtype}")
        peak = np.abs(raw).max(axis=1)
        if not (peak <= MAX_ABS_VALUE).all():
            finite = np.isfinite(peak)
            huge = np.flatnonzero(finite & (peak > MAX_ABS_VALUE))
            if len(huge):
                raise QueryError(
                    f"embeddings {huge[:10].tolist()} have values beyond "
                    f"+-{MAX_ABS_VALUE:g} (float32 norms would overflow)"
                )
            raise QueryError(f"embeddings {np.flatnonzero(~finite)[:10].tolist()} contain NaN or Inf")
        zero = np.flatnonzero(peak == 0)
        if len(zero):
            raise QueryError(f"embeddings {zero[:10].tolist()} are all zeros")
        return np.asarray(raw, dtype=np.float32)

    def external_id(self, row: int) -> str:
        """The external id of gallery row ``row`` (its row number when no ids were given)."""
        return str(self.artifact.ids[row]) if self.artifact.ids is not None else str(row)

    def metadata(self, row: int) -> dict[str, Any]:
        """Row ``row``'s metadata as JSON-ready values."""
        return {name: col[row].item() for name, col in self.artifact.metadata.items()}

    def warm_up(self) -> None:
        """Touch every structure once so the first real request does not pay for page faults."""
        probe = np.asarray(self.artifact.levels[0].rows[:1], dtype=np.float32)
        self.search(np.ascontiguousarray(probe) + 0.0, k=1)
