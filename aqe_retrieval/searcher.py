"""The searcher: one loaded index version, online query expansion, filtered top-k search.

A :class:`Searcher` is immutable once built; the service swaps whole searchers on reload, so a
request that took one keeps using it to the end. Search parameters (nprobe, efSearch, id
selectors) are passed per call, never set on the shared index.

Online expansion follows ``docs/AQE.md`` (serving mode): for level t = 0 .. qe_times - 1 the
query's neighbours are itself (weight 1) and its top ``qe_k - 1`` rows of the level-t gallery,
``q <- (q + sum_j s_j ** alpha * G_j) / qe_k``; then ``normalise(q)`` is searched in the serving
index over the expanded gallery.

Gallery ids: :meth:`Searcher.row_of` finds the row of an external id through a sorted index of
the ids array (``np.argsort``, built on first use and kept): 8 bytes a row and, measured here,
0.35 s per million 13-character ids to build, about 2 us a lookup; a Python dict would cost
about 120 bytes a row and 2.4 s per million. :meth:`Searcher.raw_rows` gives a gallery item's own
raw vector, so "more like this item" is ``search(raw_rows([row_of(id)]))``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, NamedTuple

import faiss
import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.artifact import Artifact
from aqe_retrieval.errors import QueryError, UnknownIdError
from aqe_retrieval.faiss_search import (
    bitmap_selector,
    exact_knn,
    flat_rows,
    parameters_with_selector,
    search_parameters,
    serving_knn,
)
from aqe_retrieval.filters import DEFAULT_MAX_VALUES, filter_mask
from aqe_retrieval.online import expand_online, gallery_level
from aqe_retrieval.overlay import DeltaIndex

logger = logging.getLogger(__name__)


MAX_ABS_VALUE = 1e30
MAX_NARROWING_ERROR = 1e-3
"""Largest relative error ``|q32 - q| / |q|`` that narrowing a query to float32 may cause."""


class Hit(NamedTuple):
    """One search result: a gallery row and its cosine score.

    A named tuple, not a frozen dataclass: a search of one query makes ``k`` of them, and a
    frozen dataclass costs three times as much to make (measured: 24 against 9 us for 10 hits,
    with the rows read as Python numbers first).
    """

    row: int
    score: float


class Searcher:
    """Searches one loaded artifact version; safe to share between threads."""

    def __init__(self, art: Artifact, *, max_filter_values: int = DEFAULT_MAX_VALUES) -> None:
        self.artifact = art
        self.max_filter_values = max_filter_values
        self.manifest = art.manifest
        self.version = art.manifest.version
        self.loaded_at = time.time()
        self.n, self.d = art.manifest.n, art.manifest.d
        self.qe_k = art.manifest.effective_qe_k
        self.alpha = art.manifest.alpha
        s = art.manifest.serving_index
        self._serving_params = (s.nprobe, s.ef_search)
        delta_index = isinstance(art.serving_index, DeltaIndex)
        self._ivf = None if delta_index else faiss.try_extract_index_ivf(art.serving_index)
        # made once (13 us a call), shared read-only by every search, as the levels' are
        self._params = None if delta_index else search_parameters(art.serving_index, s.nprobe, s.ef_search)
        # A flat serving index is searched over its rows by serving_knn (a GEMV for one query:
        # 2.2x faster than FAISS at 200,000 x 256). Memory-mapped codes are usually unaligned,
        # which numpy's BLAS path refuses: then a private aligned copy (n * d * 4 bytes per
        # process). Exact serving is chosen for small galleries (auto: up to 10,000 rows).
        self._flat = flat_rows(art.serving_index, copy_unaligned=True)
        self._levels = [
            gallery_level(lv.rows, lv.norms, lv.index, lv.entry.nprobe, lv.entry.ef_search)
            for lv in art.levels
        ]
        self._id_order: np.ndarray | None = None  # argsort of the ids, built on first use
        self._id_order_lock = threading.Lock()

    def expand(self, queries: np.ndarray) -> np.ndarray:
        """Online AQE of raw queries (q, d) float32 -> expanded (q, d) float32, un-normalised."""
        return expand_online(queries, self._levels, self.qe_k, self.alpha)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
        min_score: float | None = None,
        *,
        raw: bool = False,
    ) -> list[list[Hit]]:
        """Top-``k`` gallery rows for each raw query (q, d); best first, never padding.

        By default the expanded gallery is searched with the query expanded online
        (``expand=False``: the raw query). ``raw=True`` is plain kNN instead: the raw query
        over the un-expanded gallery (level 0) of the same version, through its level index
        when it has one, else exactly (``expand`` is then ignored): the baseline to A/B AQE
        against. ``min_score`` drops hits scoring below it (so fewer than ``k`` may come back).
        """
        return self.search_checked(self.check_queries(queries), k, expand, filters, min_score, raw=raw)

    def search_checked(
        self,
        q: np.ndarray,
        k: int,
        expand: bool = True,
        filters: dict[str, Any] | None = None,
        min_score: float | None = None,
        *,
        raw: bool = False,
    ) -> list[list[Hit]]:
        """:meth:`search` of queries that :meth:`check_queries` has already passed."""
        if k < 1:
            raise QueryError(f"k must be >= 1, got {k}")
        if min_score is not None and not math.isfinite(min_score):
            raise QueryError(f"min_score must be a finite number, got {min_score}")
        xq = self.expand(q) if expand and not raw else q
        u, _ = aqe.normalize_rows(xq)
        mask = (
            filter_mask(filters, self.artifact.metadata, max_values=self.max_filter_values)
            if filters
            else None
        )
        if raw and self.artifact.levels:
            sims, ids = self._level0_search(u, min(k, self.n), mask)
        else:  # no levels (qe_times 0): the serving index is over the raw gallery itself
            sims, ids = self._serving_search(u, min(k, self.n), mask)
        floor = -math.inf if min_score is None else min_score
        return [  # as Python numbers first: one numpy scalar per hit costs more than the hit
            [Hit(i, s) for s, i in zip(srow, irow, strict=True) if i >= 0 and s >= floor]
            for srow, irow in zip(sims.tolist(), ids.tolist(), strict=True)
        ]

    def _serving_search(
        self, u: np.ndarray, k: int, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._flat is not None:  # exact: serving_knn over the index's own rows
            return self._masked_exact(u, k, mask, self._flat)
        index = self.artifact.serving_index
        nprobe, ef = self._serving_params
        if isinstance(index, DeltaIndex):  # a delta version over an approximate base
            return self._delta_search(index, u, k, mask)
        if mask is None:
            return index.search(u, k, params=self._params)
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

    def _delta_search(
        self, index: DeltaIndex, u: np.ndarray, k: int, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The serving search of a :class:`DeltaIndex`, falling back as :meth:`_serving_search` does."""
        allowed = self.n if mask is None else int(mask.sum())
        if allowed == 0:
            return np.empty((len(u), 0), np.float32), np.empty((len(u), 0), np.int64)
        want = min(k, allowed)
        sims, ids = index.search(u, want, mask)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):  # a filter or the stale mask emptied the probed lists / HNSW candidates
            wider = {"nprobe": index.nlist} if index.nlist else {"ef_search": 8 * (index.ef_search or 16)}
            sims[short], ids[short] = index.search(u[short], want, mask, **wider)
            short = short[(ids[short] < 0).any(axis=1)]
        if len(short):  # still short: exactly, for those queries only
            rows = np.arange(self.n) if mask is None else np.flatnonzero(mask)
            sims[short], ids[short] = self._exact_subset(u[short], want, rows)
        return sims, ids

    def _level0_search(self, u: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Plain kNN over level 0 (the normalised raw rows): its index if it has one, else exact."""
        level = self.artifact.levels[0]
        rows = np.asarray(level.rows)
        index = level.index
        if index is None:
            return self._masked_exact(u, k, mask, rows)
        nprobe, ef = level.entry.nprobe, level.entry.ef_search
        if isinstance(index, DeltaIndex):
            if mask is not None and not mask.any():
                return np.empty((len(u), 0), np.float32), np.empty((len(u), 0), np.int64)
            sims, ids = index.search(u, k if mask is None else min(k, int(mask.sum())), mask)
        elif mask is None:
            sims, ids = index.search(u, k, params=search_parameters(index, nprobe, ef))
        else:
            if not mask.any():
                return np.empty((len(u), 0), np.float32), np.empty((len(u), 0), np.int64)
            k = min(k, int(mask.sum()))
            params = parameters_with_selector(index, bitmap_selector(mask), nprobe, ef)
            sims, ids = index.search(u, k, params=params)
        if (ids < 0).any():  # the approximate index came back short: answer exactly
            return self._masked_exact(u, k, mask, rows)
        return sims, ids

    @staticmethod
    def _masked_exact(
        u: np.ndarray, k: int, mask: np.ndarray | None, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if mask is not None:
            allowed = int(mask.sum())
            if allowed == 0:
                return np.empty((len(u), 0), np.float32), np.empty((len(u), 0), np.int64)
            k = min(k, allowed)
        return serving_knn(u, rows, k, mask)

    def _exact_subset(self, u: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.artifact.serving_index.reconstruct_batch(rows)
        sims, local = exact_knn(u, vectors, k)
        return sims, np.where(local >= 0, rows[np.maximum(local, 0)], -1)

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        """Validate a (q, d) batch: right dimension, finite, within +-1e30, not all zero.

        One pass over the values (each row's largest magnitude: NaN if it holds a NaN) before
        narrowing to float32, so values that would overflow float32 are caught. Rows are not
        rescaled (online expansion adds the query's raw scale to the gallery's raw rows, so a
        rescaled query would expand differently): a row that float32 cannot carry is refused,
        i.e. one whose norm is below the normalisation floor ``aqe.NORM_EPS`` (1e-12: its
        scores would not be cosines; this includes every row that float32 turns into zeros or
        subnormals) or that narrowing changes by more than ``MAX_NARROWING_ERROR`` (relative).
        """
        raw = np.asarray(queries)
        if raw.ndim != 2 or raw.shape[0] == 0:
            raise QueryError("send at least one query embedding")
        if raw.shape[1] != self.d:
            raise QueryError(f"embedding dimension {raw.shape[1]} does not match the index's {self.d}")
        # the kinds np.issubdtype(kind, np.number) admits, less complex (that test costs 3 us)
        if raw.dtype.kind not in "iufm":
            raise QueryError(f"embeddings must be real numbers, got {raw.dtype}")
        if len(raw) == 1 and self._one_row_passes(raw[0]):
            return np.asarray(raw, dtype=np.float32)
        peak = np.abs(raw).max(axis=1)
        if not peak.max() <= MAX_ABS_VALUE:  # NaN compares false too
            finite = np.isfinite(peak)
            huge = np.flatnonzero(finite & (peak > MAX_ABS_VALUE))
            if len(huge):
                raise QueryError(
                    f"embeddings {huge[:10].tolist()} have values beyond "
                    f"+-{MAX_ABS_VALUE:g} (float32 norms would overflow)"
                )
            raise QueryError(f"embeddings {np.flatnonzero(~finite)[:10].tolist()} contain NaN or Inf")
        q = np.asarray(raw, dtype=np.float32)
        wide = np.asarray(raw, dtype=np.float64)
        norm = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        small = norm < aqe.NORM_EPS
        if raw.dtype != np.float32:  # float32 rows narrow without error
            error = np.sqrt(np.einsum("ij,ij->i", q - wide, q - wide))  # q - wide is float64
            small |= error > MAX_NARROWING_ERROR * norm
        if not small.any():  # the common case: one check (all-zero rows are small too)
            return q
        zero = np.flatnonzero(peak == 0)
        if len(zero):
            raise QueryError(f"embeddings {zero[:10].tolist()} are all zeros")
        bad = np.flatnonzero(small)
        raise QueryError(
            f"embeddings {bad[:10].tolist()} are too small to search (norm "
            f"{norm[bad[0]]:.3g}): float32 cannot represent them, or their norm is below "
            f"{aqe.NORM_EPS:g}; scale them up"
        )

    @staticmethod
    def _one_row_passes(row: np.ndarray) -> bool:
        """Whether one query row passes every check of :meth:`check_queries`, from two dot products.

        A single query is what most requests send, and each numpy reduction costs a few
        microseconds: the checks below cost 55 us at 1 x 256 float64 (a JSON query), this 13 us.
        A finite squared norm within ``MAX_ABS_VALUE**2`` implies every value is finite and within
        +-``MAX_ABS_VALUE``. False sends the row through the full checks (which then refuse it, or
        pass a rare row this shortcut cannot: norm above MAX_ABS_VALUE with every value within it).
        """
        wide = np.asarray(row, dtype=np.float64)
        norm2 = float(np.vdot(wide, wide))
        if not (norm2 <= MAX_ABS_VALUE * MAX_ABS_VALUE and math.sqrt(norm2) >= aqe.NORM_EPS):
            return False  # NaN compares false too
        if row.dtype == np.float32:  # float32 rows narrow without error
            return True
        diff = np.asarray(row, dtype=np.float32) - wide  # float64
        return math.sqrt(float(np.vdot(diff, diff))) <= MAX_NARROWING_ERROR * math.sqrt(norm2)

    def external_id(self, row: int) -> str:
        """The external id of gallery row ``row`` (its row number when no ids were given)."""
        return str(self.artifact.ids[row]) if self.artifact.ids is not None else str(row)

    def row_of(self, external_id: str) -> int:
        """The gallery row of ``external_id`` (its row number when the version has no ids).

        Raises :class:`UnknownIdError` for an id the version does not hold.
        """
        ids = self.artifact.ids
        if ids is None:
            canonical = external_id.isascii() and external_id.isdecimal() and len(external_id) <= 20
            if canonical and str(int(external_id)) == external_id and int(external_id) < self.n:
                return int(external_id)
            raise UnknownIdError(f"no gallery item {_short(external_id)} in version {self.version}")
        if len(external_id) <= ids.dtype.itemsize // 4 and not external_id.endswith("\0"):
            order = self._sorted_ids()
            at = int(np.searchsorted(ids, external_id, sorter=order))
            if at < len(order) and ids[order[at]] == external_id:
                return int(order[at])
        raise UnknownIdError(f"no gallery item {_short(external_id)} in version {self.version}")

    def _sorted_ids(self) -> np.ndarray:
        if self._id_order is None:
            with self._id_order_lock:  # one build even when the first lookups arrive together
                if self._id_order is None:
                    assert self.artifact.ids is not None
                    self._id_order = np.argsort(self.artifact.ids, kind="stable")
        return self._id_order

    def raw_rows(self, rows: Any) -> np.ndarray:
        """Gallery rows' own raw vectors (len(rows), d) float32: level-0 ``norm * row``.

        The raw vector is what the row was built from (before expansion), so it is a query as a
        client would send it. Rows outside ``0 .. n-1`` raise :class:`UnknownIdError`.
        """
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise QueryError(f"rows must be a 1-D sequence of integers, got {r.dtype} {r.shape}")
        r = r.astype(np.int64)
        outside = r[(r < 0) | (r >= self.n)]
        if len(outside):
            raise UnknownIdError(f"rows {outside[:10].tolist()} are outside 0 .. {self.n - 1}")
        level = self.artifact.levels[0]
        return np.asarray(level.rows[r], np.float32) * np.asarray(level.norms[r], np.float32)[:, None]

    def metadata(self, row: int) -> dict[str, Any]:
        """Row ``row``'s metadata as JSON-ready values."""
        return {name: col[row].item() for name, col in self.artifact.metadata.items()}

    def warm_up(self) -> None:
        """Touch every structure once so the first real request does not pay for page faults.

        The sorted index of the ids is built here too, so the first search by id does not
        build it on the request path.
        """
        probe = np.asarray(self.artifact.levels[0].rows[:1], dtype=np.float32)
        self.search(np.ascontiguousarray(probe) + 0.0, k=1)
        self.search(np.ascontiguousarray(probe) + 0.0, k=1, raw=True)
        if self.artifact.ids is not None:
            self._sorted_ids()


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"
