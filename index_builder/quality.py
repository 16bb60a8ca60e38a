"""Retrieval quality on labelled data: raw vs AQE in both modes, exact vs approximate.

Every figure is a Market-1501 re-ID metric (``index_builder.evaluation``) of a real ranking:

* ``raw``: cosine of the raw features;
* ``aqe-transductive``: queries and gallery expanded together (the reference's semantics);
* ``aqe-serving``: the gallery expanded alone, each query expanded online (what is served);
* the same with the approximate kNN setting in use, when one is given;
* ``served-top-K``: mAP@K through the searcher code the service runs, on a real built index
  (computed by the caller that owns a searcher; see ``cli.cmd_evaluate``).

Similarities are computed one query block at a time against the whole gallery, so memory is
``O(block * G)``, never Q x G at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.online import GalleryLevel, expand_online, gallery_level
from index_builder.evaluation import ReidMetrics, rank_metrics
from index_builder.expansion import AqeParams, Expansion, expand_source
from index_builder.inputs import as_source
from index_builder.knn import KnnSpec

logger = logging.getLogger(__name__)

SIM_BLOCK_ELEMENTS = 1 << 24  # 64 MiB of float32 similarities per query block


@dataclass(frozen=True)
class Labels:
    """Identity (pid) and camera (camid) of each row."""

    pids: np.ndarray
    camids: np.ndarray

    def __getitem__(self, rows: Any) -> Labels:
        """The labels of ``rows`` (an index, slice or mask)."""
        return Labels(self.pids[rows], self.camids[rows])


def labels_from_columns(columns: dict[str, np.ndarray], pid: str = "pid", camid: str = "camid") -> Labels:
    """Labels from metadata columns ``pid`` and ``camid`` (integers)."""
    for name in (pid, camid):
        if name not in columns:
            raise ValueError(f"metadata has no {name!r} column (columns: {sorted(columns)})")
        if columns[name].dtype.kind not in "iu":
            raise ValueError(f"metadata column {name!r} must hold integers")
    return Labels(np.asarray(columns[pid]), np.asarray(columns[camid]))


def cosine_metrics(
    xq: np.ndarray,
    xg: np.ndarray,
    q: Labels,
    g: Labels,
    max_rank: int = 50,
    block_elements: int = SIM_BLOCK_ELEMENTS,
) -> ReidMetrics:
    """Metrics of ranking the gallery ``xg`` (G, d) by cosine to each query ``xq`` (Q, d).

    Queries are ranked a block at a time: ``block_elements`` similarities (float32) at most.
    """
    uq, _ = aqe.normalize_rows(xq)
    ug, _ = aqe.normalize_rows(xg)
    block = max(1, block_elements // max(len(ug), 1))
    parts = [
        rank_metrics(
            uq[lo : lo + block] @ ug.T,
            q.pids[lo : lo + block],
            g.pids,
            q.camids[lo : lo + block],
            g.camids,
            max_rank=max_rank,
        )
        for lo in range(0, len(uq), block)
    ]
    return combine(parts)


def combine(parts: list[ReidMetrics]) -> ReidMetrics:
    """Metrics of the union of disjoint query sets (means weighted by evaluated queries)."""
    valid = sum(p.num_valid for p in parts)
    skipped = sum(p.num_skipped for p in parts)
    w = [p.num_valid / valid if valid else 0.0 for p in parts]
    width = min(len(p.cmc) for p in parts)
    return ReidMetrics(
        mean_ap=float(sum(wi * p.mean_ap for wi, p in zip(w, parts, strict=True))),
        mean_inp=float(sum(wi * p.mean_inp for wi, p in zip(w, parts, strict=True))),
        cmc=np.sum([wi * p.cmc[:width] for wi, p in zip(w, parts, strict=True)], axis=0),
        num_valid=valid,
        num_skipped=skipped,
    )


@dataclass
class ServingGallery:
    """A gallery expanded over itself, with the levels online expansion searches."""

    expanded: np.ndarray
    levels: list[GalleryLevel]
    graph_recall: float | None
    effective_qe_k: int


def serving_gallery(
    xg: np.ndarray, params: AqeParams, knn: KnnSpec | None = None, block_size: int = 16384
) -> ServingGallery:
    """Expand the gallery alone and keep each level for online query expansion."""
    knn = knn or KnnSpec()
    expansion = Expansion(as_source(xg), params, knn, block_size=block_size, show_progress=False)
    levels = [
        gallery_level(lv.rows.copy(), lv.norms.copy(), lv.knn.index, ran.nprobe, ran.ef_search)
        for lv in expansion
        for ran in [lv.knn.spec or knn]  # what ran, ``auto`` resolved
    ]
    report = expansion.report
    return ServingGallery(expansion.expanded, levels, report.graph_recall, report.effective_qe_k)


def compare(
    xq: np.ndarray,
    xg: np.ndarray,
    q: Labels,
    g: Labels,
    params: AqeParams,
    knn: KnnSpec | None = None,
    max_rank: int = 50,
) -> dict[str, Any]:
    """The side-by-side table: raw, transductive AQE, serving AQE (exact and ``knn``)."""
    rows: dict[str, Any] = {"raw": cosine_metrics(xq, xg, q, g, max_rank).as_dict()}
    both, _ = expand_source(as_source(xq).concat(as_source(xg)), params, show_progress=False)
    rows["aqe-transductive"] = cosine_metrics(both[: len(xq)], both[len(xq) :], q, g, max_rank).as_dict()
    specs = [("exact", KnnSpec())]
    if knn is not None and not knn.exact:
        specs.append((knn.method + (f" nprobe={knn.nprobe}" if knn.nprobe else ""), knn))
    for name, spec in specs:
        sg = serving_gallery(xg, params, spec)
        eq = expand_online(xq, sg.levels, sg.effective_qe_k, params.alpha)
        row = cosine_metrics(eq, sg.expanded, q, g, max_rank).as_dict()
        row["graph_recall"] = sg.graph_recall
        rows[f"aqe-serving ({name})"] = row
    return rows


def sweep(
    xq: np.ndarray,
    xg: np.ndarray,
    q: Labels,
    g: Labels,
    qe_ks: list[int],
    alphas: list[float],
    qe_times: int = 1,
) -> list[dict[str, Any]]:
    """Serving-mode mAP and rank-1 over a grid of ``qe_k`` x ``alpha`` (exact kNN)."""
    out = []
    for k in qe_ks:
        for a in alphas:
            sg = serving_gallery(xg, AqeParams(qe_k=k, alpha=a, qe_times=qe_times))
            m = cosine_metrics(expand_online(xq, sg.levels, sg.effective_qe_k, a), sg.expanded, q, g)
            out.append({"qe_k": k, "alpha": a, "mAP": m.mean_ap, "rank1": m.rank(1), "mINP": m.mean_inp})
            logger.info("sweep qe_k=%d alpha=%g: mAP %.4f rank-1 %.4f", k, a, m.mean_ap, m.rank(1))
    return out
