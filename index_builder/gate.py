"""The build's quality gate: labelled queries checked up front, mAP measured on the staged version.

The inputs are read and checked before any heavy work (:func:`quality_inputs`); after the
serving index is staged, :func:`quality_gate` ranks the queries with and without expansion,
and the build is published only if :func:`gate_check` finds every threshold met.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqe_retrieval import artifact
from aqe_retrieval.errors import InputError, QualityGateError
from aqe_retrieval.online import expand_online, gallery_level
from index_builder.config import GateSpec, QualitySpec
from index_builder.evaluation import ReidMetrics
from index_builder.expansion import ExpansionReport
from index_builder.inputs import EmbeddingSource, open_embeddings, read_metadata
from index_builder.knn import sample_rows
from index_builder.quality import Labels, cosine_metrics, labels_from_columns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityInputs:
    """Raw queries ``xq`` (Q, d), their labels and the gallery's labels."""

    xq: np.ndarray
    query_labels: Labels
    gallery_labels: Labels


def quality_inputs(
    spec: QualitySpec, source: EmbeddingSource, metadata: dict[str, np.ndarray]
) -> QualityInputs:
    """Raw queries, their labels and the gallery labels, checked before any heavy work."""
    g_labels = labels_from_columns(metadata, spec.pid_column, spec.camid_column)
    if spec.queries is not None:
        if spec.query_labels is None:
            raise InputError("--quality-queries needs --quality-labels (pid, camid per query)")
        qsrc = open_embeddings(spec.queries)
        if qsrc.d != source.d:
            raise InputError(f"{spec.queries}: dimension {qsrc.d}, the gallery's is {source.d}")
        xq = np.concatenate([b for _, b in qsrc.blocks(65536)])
        q_labels = labels_from_columns(
            read_metadata(spec.query_labels, qsrc.n), spec.pid_column, spec.camid_column
        )
    else:
        rows = sample_rows(source.n, spec.sample, spec.seed)
        xq = source.take(rows)
        q_labels = g_labels[rows]
    return QualityInputs(xq, q_labels, g_labels)


def quality_gate(
    stage: artifact.Staging,
    u: np.ndarray,
    report: ExpansionReport,
    alpha: float,
    gate: GateSpec,
    inputs: QualityInputs,
) -> dict[str, Any]:
    """mAP with and without expansion on the staged version; raises if the gate refuses it.

    ``u`` (n, d) float32 are the staged serving rows; returns the manifest's ``quality`` record.
    """
    xq, q_labels, g_labels = inputs.xq, inputs.query_labels, inputs.gallery_labels
    levels = [
        gallery_level(lv.rows, lv.norms, lv.index, lv.entry.nprobe, lv.entry.ef_search)
        for lv in stage.load_levels(u.shape[0], u.shape[1])
    ]
    raw = cosine_metrics(xq, levels[0].rows, q_labels, g_labels)
    eq = expand_online(xq, levels, report.effective_qe_k, alpha)
    expanded = cosine_metrics(eq, u, q_labels, g_labels)
    record = gate_check(raw, expanded, report.graph_recall, gate)
    record["queries"] = len(xq)
    logger.info(
        "quality: mAP raw %.4f, AQE %.4f (%+.4f) on %d queries; graph recall %s",
        raw.mean_ap,
        expanded.mean_ap,
        record["map_gain"],
        len(xq),
        report.graph_recall,
    )
    if not record["passed"]:
        raise QualityGateError("quality gate refused the build: " + "; ".join(record["reasons"]))
    return record


def gate_check(
    raw: ReidMetrics, expanded: ReidMetrics, graph_recall: float | None, spec: GateSpec
) -> dict[str, Any]:
    """The gate's record: measured figures, thresholds, reasons for refusal (empty: passed)."""
    gain = expanded.mean_ap - raw.mean_ap
    reasons = []
    if spec.min_map_gain is not None and gain < spec.min_map_gain:
        reasons.append(
            f"AQE changes mAP by {gain:+.4f} ({raw.mean_ap:.4f} -> "
            f"{expanded.mean_ap:.4f}), below the required {spec.min_map_gain:+.4f}"
        )
    if spec.min_graph_recall is not None and (graph_recall or 1.0) < spec.min_graph_recall:
        reasons.append(f"graph recall {graph_recall:.4f} is below the required {spec.min_graph_recall:.4f}")
    if (
        spec.graph_recall_target is not None
        and graph_recall is not None
        and graph_recall < spec.graph_recall_target
    ):
        reasons.append(f"graph recall {graph_recall:.4f} is below its target {spec.graph_recall_target:.4f}")
    return {
        "raw": raw.as_dict() | {"cmc": None},
        "aqe": expanded.as_dict() | {"cmc": None},
        "map_gain": gain,
        "graph_recall": graph_recall,
        "min_map_gain": spec.min_map_gain,
        "min_graph_recall": spec.min_graph_recall,
        "passed": not reasons,
        "reasons": reasons,
    }
