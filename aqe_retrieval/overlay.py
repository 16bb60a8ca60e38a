"""Search a delta version through its base's approximate index: the base masked, plus the delta rows.

A version made by ``add``/``delete`` keeps its base's ``.faiss`` file (IVF-Flat/SQ8/PQ, HNSW,
on-disk lists: whatever the full build made) untouched and hard-linked. :class:`DeltaIndex`
serves it as a full build's index over the version's rows would be served:

* the base index is searched with a FAISS ``IDSelectorBitmap`` over base ids, passed per call
  in ``SearchParametersIVF``/``SearchParametersHNSW`` with the manifest's nprobe/efSearch, that
  excludes the *stale* base rows: deleted ones, and those whose value changed (their view
  position is in the level's delta ``pos``); its ids are mapped to view positions
  (:meth:`aqe_retrieval.delta.View.renumber`);
* the delta rows (changed and appended, ``delta_level_<t>_rows.npy``) are searched exactly
  by FAISS's flat kNN over ``m x d`` float32 (:func:`~aqe_retrieval.faiss_search.exact_knn`),
  their local ids mapped to their positions. Not numpy's BLAS: right after a FAISS search it
  cost 14-17 ms a query here against FAISS's 0.1-0.3 ms (13,594 x 64, 1 thread, measured with
  ``benchmarks/bench_incremental.py``'s version; numpy's OpenBLAS threads wait on the cores
  FAISS's OpenMP threads still spin on);
* both lists are merged per query into the top ``k``.

A filter (``mask`` over view positions) composes with the stale mask: the base bitmap is the
filter moved to base ids AND not stale, the delta rows are those the filter admits. A deleted
row is therefore never returned, and never a neighbour in online expansion, whatever the base
index would have answered.

The delta index is exact and built at load (nothing stored: it is the rows already in the
delta). Its cost per query is ``m x d`` multiply-adds; ``benchmarks/bench_incremental.py``
prints the delta's size next to the base's. Memory: the delta rows (``m * d * 4`` bytes), a
base-id bitmap and a base-to-view map (``8 * base_n`` bytes); the base index stays mapped.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from aqe_retrieval.delta import View
from aqe_retrieval.faiss_search import bitmap_selector, exact_knn, parameters_with_selector


class DeltaIndex:
    """A base FAISS index with stale rows masked out plus exactly searched delta rows."""

    def __init__(
        self,
        base: Any,
        view: View,
        pos: np.ndarray,
        rows: np.ndarray,
        nprobe: int | None,
        ef_search: int | None,
    ) -> None:
        """``base`` over ``view.base_n`` rows; ``rows`` (len(pos), d) the values at view ``pos``."""
        pos = np.asarray(pos, dtype=np.int64)
        if len(pos) != len(rows) or (pos.size and (pos.min() < 0 or pos.max() >= view.n)):
            raise ValueError(f"delta positions must be {len(rows)} positions of 0 .. {view.n - 1}")
        alive = len(view.alive)
        if not np.isin(np.arange(alive, view.n), pos).all():
            raise ValueError("the delta rows must cover every appended position")
        self.base, self.view = base, view
        self.ntotal, self.d = view.n, base.d
        self.nprobe, self.ef_search = nprobe, ef_search
        ivf = faiss.try_extract_index_ivf(base)
        self.nlist: int | None = int(ivf.nlist) if ivf is not None else None
        order = np.argsort(pos, kind="stable")  # sorted, for reconstruct_batch's lookup
        self.pos = pos[order]
        self.rows = np.ascontiguousarray(np.asarray(rows)[order], dtype=np.float32)
        self.to_view = view.renumber(np.arange(view.base_n))  # base id -> view position, -1 dead
        fresh = np.zeros(view.base_n, dtype=bool)  # base rows whose base value is still served
        fresh[view.alive] = True
        fresh[view.alive[pos[pos < alive]]] = False
        self.fresh = fresh
        self.fresh_count = int(fresh.sum())
        # read-only during a search, so one parameter object serves every thread
        self._fresh_params = parameters_with_selector(base, bitmap_selector(fresh), nprobe, ef_search)
        self._in_delta = np.zeros(view.n, dtype=bool)
        self._in_delta[pos] = True

    def search(
        self,
        u: np.ndarray,
        k: int,
        mask: np.ndarray | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` view positions for normalised queries ``u`` (q, d): (sims, ids) (q, k).

        ``mask`` (n,) bool over view positions admits only those rows; ``nprobe`` (an IVF base)
        or ``ef_search`` (HNSW) override the manifest's. Fewer than ``k`` found: ids ``-1``,
        sims ``-inf`` at the end.
        """
        q = np.ascontiguousarray(u, dtype=np.float32)
        if mask is None:
            count, delta_mask = self.fresh_count, None
        else:
            base_ok = np.zeros(self.view.base_n, dtype=bool)
            base_ok[self.view.alive] = mask[: len(self.view.alive)]
            base_ok &= self.fresh
            count, delta_mask = int(base_ok.sum()), mask[self.pos]
        parts_s, parts_i = [], []
        if count:
            if mask is None and nprobe is None and ef_search is None:
                params = self._fresh_params
            else:
                sel = bitmap_selector(self.fresh if mask is None else base_ok)
                ef = ef_search or self.ef_search
                params = parameters_with_selector(self.base, sel, nprobe or self.nprobe, ef)
            sims, ids = self.base.search(q, min(k, count), params=params)
            view_ids = np.where(ids >= 0, self.to_view[np.maximum(ids, 0)], -1)
            parts_s.append(np.where(view_ids >= 0, sims, -np.inf).astype(np.float32))
            parts_i.append(view_ids)
        pos, rows = self.pos, self.rows
        if delta_mask is not None:  # the admitted delta rows (a copy: the delta is small)
            pos, rows = pos[delta_mask], rows[delta_mask]
        if len(pos):
            sims, local = exact_knn(q, rows, min(k, len(pos)))
            parts_s.append(np.where(local >= 0, sims, -np.inf).astype(np.float32))
            parts_i.append(np.where(local >= 0, pos[np.maximum(local, 0)], -1))
        return merge(parts_s, parts_i, len(q), k)

    def reconstruct_batch(self, view_rows: np.ndarray) -> np.ndarray:
        """The served vectors of view positions (len, d) float32 (base rows as the base stores them)."""
        r = np.asarray(view_rows, dtype=np.int64)
        out = np.empty((len(r), self.d), np.float32)
        in_delta = self._in_delta[r]
        if in_delta.any():
            out[in_delta] = self.rows[np.searchsorted(self.pos, r[in_delta])]
        if (~in_delta).any():
            out[~in_delta] = self.base.reconstruct_batch(self.view.alive[r[~in_delta]])
        return out


def merge(
    parts_s: list[np.ndarray], parts_i: list[np.ndarray], nq: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query top ``k`` of several (sims, ids) lists (ids ``-1`` = nothing), padded with -1/-inf."""
    if not parts_s:
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    sims = np.concatenate(parts_s, axis=1)
    ids = np.concatenate(parts_i, axis=1)
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.concatenate([sims, np.full((nq, pad), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((nq, pad), -1, np.int64)], axis=1)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, axis=1), np.take_along_axis(ids, top, axis=1)
