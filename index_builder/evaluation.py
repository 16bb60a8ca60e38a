"""Re-ID retrieval metrics (mAP, CMC, mINP) under the Market-1501 protocol.

Pure numpy: no FAISS, no I/O. Two entry points share one result type:

- :func:`rank_metrics` ranks the whole gallery from a dense ``(Q, G)`` similarity
  matrix, processed in query blocks so peak memory is ``O(block_size * G)``.
- :func:`topk_metrics` scores per-query top-K lists as returned by a search
  (the served path), where only the K returned rows are known.

Protocol, for each query ``q``:

1. Rank the gallery by similarity, higher first; ties keep gallery index
   ascending (stable sort).
2. Drop *junk* rows: same pid AND same camid as ``q`` (the same identity seen by
   the same camera is neither rewarded nor penalised). The remaining rows keep
   their order and are re-numbered ``1, 2, ...``.
3. Positives are the remaining rows with the query's pid. A query with no
   positive is skipped and counted in ``num_skipped``.
4. With positives at 1-based ranks ``r_1 < ... < r_n``:
   ``AP = mean_j (j / r_j)``, ``CMC[k] = 1 if r_1 <= k``, ``INP = n / r_n``.

Metrics are means over the evaluated (non-skipped) queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

# Elements of one (block, G) working set; ~80 bytes each, so about 320 MiB at peak.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ReidMetrics:
    """Aggregated re-ID metrics; ``cmc[k - 1]`` is the rank-k hit rate."""

    mean_ap: float
    mean_inp: float
    cmc: npt.NDArray[np.float64]
    num_valid: int
    num_skipped: int

    def rank(self, k: int) -> float:
        """Return the CMC rank-k hit rate (k is 1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank k={k} outside the CMC curve 1..{len(self.cmc)}")
        return float(self.cmc[k - 1])

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: mAP, mINP, rank1/5/10 where defined, full CMC, counts."""
        out: dict[str, Any] = {"mAP": self.mean_ap, "mINP": self.mean_inp}
        for k in (1, 5, 10):
            if k <= len(self.cmc):
                out[f"rank{k}"] = self.rank(k)
        out["cmc"] = [float(v) for v in self.cmc]
        out["num_valid"] = self.num_valid
        out["num_skipped"] = self.num_skipped
        return out


def _labels(name: str, values: npt.ArrayLike, n: int) -> npt.NDArray[Any]:
    """Return ``values`` as a 1-D array of length ``n`` or raise ValueError."""
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    return arr


def _score_rows(
    pos: npt.NDArray[np.bool_], keep: npt.NDArray[np.bool_], num_pos: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Per-row AP (divided by ``num_pos``), first-positive rank and INP from ranked masks.

    ``pos``/``keep``: (B, L) bool in ranked order, ``pos`` implies ``keep``.
    ``num_pos``: (B,) int64, the AP/INP denominators (> 0).
    Returns ``ap`` (B,) float64, ``first`` (B,) int64 1-based rank among kept rows
    of the first positive (``L + 1`` if none listed), ``inp`` (B,) float64 which
    is 0 where fewer than ``num_pos`` positives are listed.
    """
    kept_rank = np.cumsum(keep, axis=1)  # 1-based rank among kept rows
    hits = np.cumsum(pos, axis=1)
    prec = np.where(pos, hits / np.maximum(kept_rank, 1), 0.0)
    ap = prec.sum(axis=1) / num_pos
    any_pos = pos.any(axis=1)
    rows = np.arange(pos.shape[0])
    first_col = np.argmax(pos, axis=1)
    first = np.where(any_pos, kept_rank[rows, first_col], pos.shape[1] + 1)
    last_col = pos.shape[1] - 1 - np.argmax(pos[:, ::-1], axis=1)
    last = kept_rank[rows, last_col]
    complete = hits[:, -1] == num_pos
    inp = np.where(complete & any_pos, num_pos / np.maximum(last, 1), 0.0)
    return ap, first.astype(np.int64), inp


def _aggregate(
    ap: list[npt.NDArray[np.float64]],
    first: list[npt.NDArray[np.int64]],
    inp: list[npt.NDArray[np.float64]],
    curve_len: int,
    num_skipped: int,
) -> ReidMetrics:
    """Average per-query scores over the evaluated queries."""
    ap_all = np.concatenate(ap) if ap else np.zeros(0)
    if ap_all.size == 0:
        raise ValueError("no query has a positive in the gallery; metrics undefined")
    first_all = np.concatenate(first)
    ks = np.arange(1, curve_len + 1)
    cmc = (first_all[:, None] <= ks[None, :]).mean(axis=0)
    return ReidMetrics(
        mean_ap=float(ap_all.mean()),
        mean_inp=float(np.concatenate(inp).mean()),
        cmc=cmc.astype(np.float64),
        num_valid=int(ap_all.size),
        num_skipped=num_skipped,
    )


def rank_metrics(
    sim: npt.ArrayLike,
    q_pids: npt.ArrayLike,
    g_pids: npt.ArrayLike,
    q_camids: npt.ArrayLike,
    g_camids: npt.ArrayLike,
    max_rank: int = 50,
    block_size: int | None = None,
) -> ReidMetrics:
    """Compute mAP, CMC and mINP over full gallery rankings from a similarity matrix.

    ``sim``: (Q, G) float similarity, higher is better, finite values only.
    ``q_pids``/``q_camids``: (Q,) int; ``g_pids``/``g_camids``: (G,) int.
    The CMC curve has ``min(max_rank, G)`` entries. Queries are processed
    ``block_size`` at a time (default ``max(1, 2**22 // G)``): peak extra memory
    is about ``80 * block_size * G`` bytes, ~320 MiB with the default.
    """
    sim_arr = np.asarray(sim)
    if sim_arr.ndim != 2:
        raise ValueError(f"sim must be 2-D (Q, G), got shape {sim_arr.shape}")
    nq, ng = sim_arr.shape
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if block_size is None:
        block_size = max(1, BLOCK_ELEMENTS // max(ng, 1))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    qp, qc = _labels("q_pids", q_pids, nq), _labels("q_camids", q_camids, nq)
    gp, gc = _labels("g_pids", g_pids, ng), _labels("g_camids", g_camids, ng)
    if not np.isfinite(sim_arr).all():
        raise ValueError("sim contains NaN or infinite values")

    ap, first, inp = [], [], []
    skipped = 0
    for start in range(0, nq, block_size):
        stop = min(start + block_size, nq)
        order = np.argsort(-sim_arr[start:stop], axis=1, kind="stable")
        same_pid = gp[order] == qp[start:stop, None]
        same_cam = gc[order] == qc[start:stop, None]
        keep = ~(same_pid & same_cam)
        pos = same_pid & ~same_cam
        num_pos = pos.sum(axis=1)
        valid = num_pos > 0
        skipped += int((~valid).sum())
        if valid.any():
            a, f, i = _score_rows(pos[valid], keep[valid], num_pos[valid])
            ap.append(a)
            first.append(f)
            inp.append(i)
    result = _aggregate(ap, first, inp, min(max_rank, ng), skipped)
    logger.debug("rank_metrics: %d queries evaluated, %d skipped", result.num_valid, skipped)
    return result


def topk_metrics(
    ranked_ids: npt.ArrayLike,
    q_pids: npt.ArrayLike,
    g_pids: npt.ArrayLike,
    q_camids: npt.ArrayLike,
    g_camids: npt.ArrayLike,
    max_rank: int = 50,
) -> ReidMetrics:
    """Compute mAP@K, CMC@k (k <= K) and mINP@K from per-query top-K result lists.

    ``ranked_ids``: (Q, K) int gallery row indices, best first; ``-1`` marks an
    empty slot (as FAISS returns) and is ignored. ``q_pids``/``q_camids``: (Q,)
    int; ``g_pids``/``g_camids``: (G,) int describe the whole gallery.

    Exact definition per query: junk entries (same pid and camid as the query)
    and ``-1`` slots are removed from the list, the rest re-numbered 1, 2, ...;
    ``n`` = positives in the WHOLE gallery (same pid, other camid); queries with
    ``n == 0`` are skipped. With listed positives at ranks ``r_1 < ... < r_m``:
    ``AP@K = sum_j (j / r_j) / min(n, K)``; ``CMC[k] = 1 if m > 0 and r_1 <= k``;
    ``INP@K = n / r_m`` if all ``n`` positives are listed (``m == n``), else 0.
    Junk entries still take up slots of the K, so request a few extra results
    when the gallery holds same-camera copies of the query. The CMC curve has
    ``min(max_rank, K)`` entries. Memory is ``O(Q * K + G)``.
    """
    ids = np.asarray(ranked_ids)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"ranked_ids must be 2-D (Q, K) with K >= 1, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ranked_ids must be integers, got dtype {ids.dtype}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    nq, k = ids.shape
    qp, qc = _labels("q_pids", q_pids, nq), _labels("q_camids", q_camids, nq)
    gp = np.asarray(g_pids)
    if gp.ndim != 1:
        raise ValueError(f"g_pids must be 1-D, got shape {gp.shape}")
    gc = _labels("g_camids", g_camids, gp.shape[0])
    ng = gp.shape[0]
    if ((ids < -1) | (ids >= ng)).any():
        raise ValueError(f"ranked_ids must lie in [-1, {ng}), got range [{ids.min()}, {ids.max()}]")
    sorted_ids = np.sort(ids, axis=1)
    if ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any():
        raise ValueError("ranked_ids repeats a gallery index within a query's list")

    num_pos = _count_positives(qp, qc, gp, gc)
    present = ids >= 0
    safe = np.where(present, ids, 0)
    same_pid = present & (gp[safe] == qp[:, None])
    same_cam = gc[safe] == qc[:, None]
    keep = present & ~(same_pid & same_cam)
    pos = same_pid & ~same_cam
    valid = num_pos > 0
    ap, first, inp = [], [], []
    if valid.any():
        a, f, i = _score_rows(pos[valid], keep[valid], num_pos[valid])
        # _score_rows divides by n; AP@K divides by min(n, K) instead.
        ap.append(a * num_pos[valid] / np.minimum(num_pos[valid], k))
        first.append(f)
        inp.append(i)
    skipped = int((~valid).sum())
    result = _aggregate(ap, first, inp, min(max_rank, k), skipped)
    logger.debug("topk_metrics: %d queries evaluated, %d skipped", result.num_valid, skipped)
    return result


def _count_positives(
    qp: npt.NDArray[Any], qc: npt.NDArray[Any], gp: npt.NDArray[Any], gc: npt.NDArray[Any]
) -> npt.NDArray[np.int64]:
    """Return (Q,) int64: number of gallery rows with the query's pid and another camid."""
    nq = qp.shape[0]
    _, pid_code = np.unique(np.concatenate([qp, gp]), return_inverse=True)
    cams, cam_code = np.unique(np.concatenate([qc, gc]), return_inverse=True)
    pid_code, cam_code = pid_code.ravel().astype(np.int64), cam_code.ravel().astype(np.int64)
    pair_code = pid_code * len(cams) + cam_code
    return _count_in(pid_code[:nq], pid_code[nq:]) - _count_in(pair_code[:nq], pair_code[nq:])


def _count_in(keys: npt.NDArray[np.int64], pool: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Return, for each key, how many times it occurs in ``pool`` (both int64 1-D)."""
    values, counts = np.unique(pool, return_counts=True)
    if values.size == 0:
        return np.zeros(keys.shape, dtype=np.int64)
    idx = np.minimum(np.searchsorted(values, keys), values.size - 1)
    return np.where(values[idx] == keys, counts[idx], 0).astype(np.int64)
