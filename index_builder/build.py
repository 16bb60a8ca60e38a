"""The build job: read the gallery, expand it, index it, publish a version.

Every input check runs before the heavy work, and nothing is published unless every phase
succeeded: a failure anywhere leaves ``current`` and the previous versions as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import replace
from typing import Any

import faiss
import numpy as np

from aqe_retrieval import aqe, artifact
from index_builder import changes
from index_builder.config import AUTO, BuildConfig
from index_builder.expansion import Expansion, ExpansionReport, Level
from index_builder.gate import QualityInputs, quality_gate, quality_inputs
from index_builder.graph_auto import below_target
from index_builder.heldout import QuerySample, expanded_queries
from index_builder.inputs import EmbeddingSource, fingerprint, gallery_ids, gallery_metadata, open_embeddings
from index_builder.knn import KnnSpec, sample_rows, use_batch_lists
from index_builder.serving import build_serving_index, expansion_index

logger = logging.getLogger(__name__)


def build(config: BuildConfig) -> artifact.Manifest:
    """Run the whole job and publish a new version under ``config.root``; returns its manifest."""
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = open_embeddings(config.gallery, config.columns)
    ids = gallery_ids(source, config.ids)
    metadata = gallery_metadata(source, config.metadata)
    folded = changes.fold(config.root, source, ids, metadata) if config.changes else None
    if folded is not None:  # the adds/deletes logged since --gallery was exported
        source, ids, metadata = folded.source, folded.ids, folded.metadata
    checks = quality_inputs(config.quality, source, metadata) if config.quality else None
    input_info = input_record(config, source)
    logged = folded.records if folded else []
    input_info["changes_through"] = logged[-1].order if logged else None
    timings["inputs"] = time.perf_counter() - t0
    logger.info("gallery: %d x %d %s from %d file(s)", source.n, source.d, source.dtype, len(source.paths))

    with artifact.staging(config.root) as stage:
        t1 = time.perf_counter()
        expansion = Expansion(
            source,
            config.params,
            config.knn,
            block_size=config.block_size,
            show_progress=config.show_progress,
            label=str(config.gallery),
        )
        graphs: list[tuple[KnnSpec | None, tuple[dict[str, Any], ...]]] = []
        for level in expansion:
            save_level(stage, level, config)
            # kept so that ``add``/``delete`` can update the graph instead of rebuilding it
            stage.save_graph(level.number, level.knn.ids, level.knn.sims)
            graphs.append((level.knn.spec, level.knn.tried))
        del level  # staged: the last level's rows and graph must not outlive the expansion
        report = expansion.report
        timings["expand"] = time.perf_counter() - t1
        timings["read"] = report.read_seconds
        timings["knn"] = sum(r.knn_seconds for r in report.rounds)

        t2 = time.perf_counter()
        u = expansion.expanded
        aqe.normalize_rows_inplace(u, config.block_size)
        queries = serving_queries(stage, u, report, config, checks)
        index, serving_entry = build_serving_index(
            u, config.serving, config.block_size, config.show_progress, queries=queries
        )
        stage.save_serving_index(index, serving_entry)
        del index
        timings["serving_index"] = time.perf_counter() - t2
        quality = None
        if config.quality is not None and checks is not None:
            t4 = time.perf_counter()
            gate = replace(config.quality.gate, graph_recall_target=config.knn.recall_target)
            quality = quality_gate(stage, u, report, config.params.alpha, gate, checks)
            timings["quality"] = time.perf_counter() - t4
        del u, expansion  # the expanded rows are staged: release them before publishing

        if ids is not None:
            stage.save_ids(ids)
        if metadata:
            stage.save_metadata(metadata)
        t3 = time.perf_counter()
        timings["total"] = t3 - t0
        manifest = stage.publish(
            keep=config.keep,
            n=source.n,
            d=source.d,
            qe_k=config.params.qe_k,
            effective_qe_k=report.effective_qe_k,
            alpha=config.params.alpha,
            qe_times=config.params.qe_times,
            knn=knn_record(config.knn, source.d, graphs),
            graph_recall=report.graph_recall,
            graph_recall_target=config.knn.recall_target if report.graph_recall is not None else None,
            graph_below_target=below_target(report.graph_recall, config.knn.recall_target),
            graph_recall_sample=max((r.recall_sample for r in report.rounds), default=0),
            input=input_info,
            timings_s={k: round(v, 3) for k, v in timings.items()},
            quality=quality,
            history=[r.operation for r in logged],  # a retried add/delete folded in is a no-op
        )
    logger.info("publish took %.1fs", time.perf_counter() - t3)
    return manifest


def save_level(stage: artifact.Staging, level: Level, config: BuildConfig) -> None:
    """Stage one level with the index online expansion searches in it: its own, the graph's, or none.

    After an exact graph (no index) and with ``expansion_index="auto"``, a large level gets an
    index of its own (:func:`~index_builder.serving.expansion_index`); otherwise the graph's
    index, if any, is kept.
    """
    graph = level.knn
    ran = graph.spec or config.knn  # what ran, ``--knn auto`` resolved
    index, entry = None, None
    if graph.index is None and config.expansion_index == AUTO:
        index, entry = expansion_index(level.rows, config, level.number)
    if entry is not None:
        stage.save_level(
            level.number,
            level.rows,
            level.norms,
            index=index,
            index_type=entry.spec,
            nprobe=entry.nprobe,
            ef_search=entry.ef_search,
            recall_at_k=entry.recall_at_k,
            recall_k=entry.recall_k,
        )
        saved = stage.levels[-1]  # the auto choice's record (Staging.save_level predates it)
        saved.recall_target, saved.below_target = entry.recall_target, entry.below_target
        saved.candidates = entry.candidates
    else:
        stage.save_level(
            level.number,
            level.rows,
            level.norms,
            index=graph.index,
            index_type="exact" if graph.index is None else ran.method,
            nprobe=ran.nprobe,
            ef_search=ran.ef_search,
            recall_at_k=graph.recall,
            recall_k=config.params.qe_k,
        )


def input_record(config: BuildConfig, source: EmbeddingSource) -> dict[str, Any]:
    """The manifest's ``input`` record: the files read, their dtype, shards and fingerprint."""
    files = [*source.files, *(p for p in (config.ids, config.metadata) if p)]
    return {
        "gallery": str(config.gallery),
        "ids": str(config.ids) if config.ids else None,
        "metadata": str(config.metadata) if config.metadata else None,
        "dtype": str(source.dtype),
        "shards": len(source.paths),
        "columns": dataclasses.asdict(source.columns) if source.columns else None,
        "fingerprint": fingerprint(files),
    }


def knn_record(
    spec: KnnSpec, d: int, graphs: list[tuple[KnnSpec | None, tuple[dict[str, Any], ...]]] | None = None
) -> dict[str, Any]:
    """The manifest's ``knn`` record: how the neighbour graph was found (``auto`` resolved).

    ``graphs``: per round, the spec that ran and what ``auto`` tried. With ``auto``,
    ``method``/``nprobe`` are the first round's, and ``auto`` lists every round's.
    """
    ran = (graphs[0][0] if graphs else None) or spec
    record: dict[str, Any] = {
        "method": "exact" if ran.exact else ran.method,
        "nprobe": ran.nprobe,
        "ef_search": ran.ef_search,
        "train_size": spec.train_size,
        "recall_sample": spec.recall_sample,
        "seed": spec.seed,
        "batch_lists": ran.method.lower() != AUTO and use_batch_lists(ran, d),
        "recall_target": spec.recall_target,
    }
    if spec.method.lower() == AUTO and graphs:
        record["requested"] = AUTO
        record["auto"] = [
            {"method": r.method if r else None, "nprobe": r.nprobe if r else None, "tried": list(tried)}
            for r, tried in graphs
        ]
    return record


def serving_queries(
    stage: artifact.Staging,
    u: np.ndarray,
    report: ExpansionReport,
    config: BuildConfig,
    checks: QualityInputs | None,
) -> QuerySample | None:
    """Queries the serving index is measured with, as they arrive: expanded online (None: exact).

    ``--quality-queries`` when given, else held-out gallery rows (``index_builder.heldout``).
    """
    serving = config.serving
    if serving.method.lower() == "exact":
        return None
    levels = stage.load_levels(u.shape[0], u.shape[1])
    qe_k, alpha = report.effective_qe_k, config.params.alpha
    if checks is not None and config.quality is not None and config.quality.queries is not None:
        return expanded_queries(levels, qe_k, alpha, raw=checks.xq[: serving.recall_sample])
    return expanded_queries(
        levels, qe_k, alpha, rows=sample_rows(u.shape[0], serving.recall_sample, serving.seed)
    )
