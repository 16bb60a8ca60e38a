"""The build job: read the gallery, expand it, index it, publish a version.

Every input check runs before the heavy work, and nothing is published unless every phase
succeeded: a failure anywhere leaves ``current`` and the previous versions as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from aqe_retrieval import aqe, artifact
from index_builder import budget, changes
from index_builder.config import AUTO, BuildConfig, GateSpec, ServingSpec
from index_builder.expansion import AqeParams, Expansion, ExpansionReport, Level
from index_builder.gate import QualityInputs, quality_gate, quality_inputs
from index_builder.graph_auto import GRAPH_EXACT_MAX_N, below_target, graph_nlist
from index_builder.heldout import QuerySample, expanded_queries
from index_builder.inputs import EmbeddingSource, fingerprint, gallery_ids, gallery_metadata, open_embeddings
from index_builder.knn import EXACT, KnnSpec, index_size, sample_rows, use_batch_lists
from index_builder.ondisk import OnDiskLists
from index_builder.pool import worker_count
from index_builder.serving import build_serving_index, choose_serving_method, expansion_index, serves_exactly
from index_builder.serving_auto import Shared
from index_builder.storage import ArrayStore

logger = logging.getLogger(__name__)


def build(config: BuildConfig) -> artifact.Manifest:
    """Run the whole job and publish a new version under ``config.root``; returns its manifest."""
    if config.cluster is not None:
        from index_builder.dist_build import build_on_cluster  # imports this module

        return build_on_cluster(config)
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
    plan = budget.plan_build(
        budget.detect_budget(config.memory_budget),
        workload(
            source.n,
            source.d,
            config.params,
            config.knn,
            config.block_size,
            config.serving,
            config.expansion_index == AUTO,
        ),
    )
    logger.info("%s", plan.describe())
    if not plan.resident:
        budget.bound_malloc()
        gate_bytes = 2 * source.n * source.d * 4
        if config.quality is not None and gate_bytes > plan.budget.bytes - budget.BASE_BYTES:
            raise budget.BudgetError(
                f"the quality gate ranks the whole gallery in memory ({budget.format_size(gate_bytes)}), "
                f"more than the budget {budget.format_size(plan.budget.bytes)} allows; needs at least "
                f"{budget.format_size(budget.BASE_BYTES + gate_bytes)}, or build without the gate"
            )

    with artifact.staging(config.root) as stage:
        t1 = time.perf_counter()
        store = array_store(stage, plan, config)
        expansion = Expansion(
            source,
            config.params,
            config.knn,
            block_size=config.block_size,
            show_progress=config.show_progress,
            label=str(config.gallery),
            plan=plan,
            store=store,
        )
        graphs: list[tuple[KnnSpec | None, tuple[dict[str, Any], ...]]] = []
        shared = Shared()  # what the expansion and serving index selections share
        for level in expansion:
            save_level(stage, level, config, shared, plan)
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
        aqe.normalize_rows_inplace(
            u, plan.block_size, out=store.empty("expanded_norms", (source.n,), "float32")
        )
        queries = serving_queries(stage, u, report, config, checks)
        # HNSW links over level 0, the distinct gallery rows (index_builder.serving_auto)
        graph_rows = None if queries is None else stage.load_levels(source.n, source.d)[0].rows
        index, serving_entry = build_serving_index(
            u, config.serving, plan.block_size, config.show_progress, queries=queries,
            graph_rows=graph_rows, shared=shared,
            lists=ondisk_lists(stage, plan, stage.serving_ivfdata_path()),
            flat_limit=None if plan.resident else plan.budget.bytes - budget.BASE_BYTES,
        )  # fmt: skip
        del graph_rows, shared
        stage.save_serving_index(index, serving_entry)
        del index
        timings["serving_index"] = time.perf_counter() - t2
        quality = None
        if config.quality is not None and checks is not None:
            t4 = time.perf_counter()
            quality = quality_gate(stage, u, report, config.params.alpha, gate_spec(config), checks)
            timings["quality"] = time.perf_counter() - t4
        del u, expansion  # the expanded rows are staged: release them before publishing

        manifest = publish(
            stage, config, report, input_info, timings, quality, ids, metadata, started=t0,
            graphs=graphs, history=[r.operation for r in logged],  # a retried add/delete folded in is a no-op
        )  # fmt: skip
    return manifest


def gate_spec(config: BuildConfig) -> GateSpec:
    """The quality gate's thresholds, with the graph's recall target (a graph below it is refused)."""
    assert config.quality is not None
    return replace(config.quality.gate, graph_recall_target=config.knn.recall_target)


def publish(
    stage: artifact.Staging,
    config: BuildConfig,
    report: ExpansionReport,
    input_info: dict[str, Any],
    timings: dict[str, float],
    quality: dict[str, Any] | None,
    ids: list[str] | None,
    metadata: dict[str, np.ndarray],
    *,
    started: float,
    graphs: list[tuple[KnnSpec | None, tuple[dict[str, Any], ...]]] | None = None,
    history: list[str] | None = None,
) -> artifact.Manifest:
    """Stage ids and metadata, then publish the version with its manifest (one build or a cluster's)."""
    if ids is not None:
        stage.save_ids(ids)
    if metadata:
        stage.save_metadata(metadata)
    t0 = time.perf_counter()
    timings["total"] = t0 - started
    manifest = stage.publish(
        keep=config.keep,
        n=report.n,
        d=report.d,
        qe_k=config.params.qe_k,
        effective_qe_k=report.effective_qe_k,
        alpha=config.params.alpha,
        qe_times=config.params.qe_times,
        knn=knn_record(config.knn, report.d, graphs),
        graph_recall=report.graph_recall,
        graph_recall_target=config.knn.recall_target if report.graph_recall is not None else None,
        graph_below_target=below_target(report.graph_recall, config.knn.recall_target),
        graph_recall_sample=max((r.recall_sample for r in report.rounds), default=0),
        input=input_info,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        quality=quality,
        history=history or [],
    )
    logger.info("publish took %.1fs", time.perf_counter() - t0)
    return manifest


def save_level(
    stage: artifact.Staging,
    level: Level,
    config: BuildConfig,
    shared: Shared | None = None,
    plan: budget.Plan | None = None,
) -> None:
    """Stage one level with the index online expansion searches in it: its own, the graph's, or none.

    After an exact graph (no index) and with ``expansion_index="auto"``, a large level gets an
    index of its own (:func:`~index_builder.serving.expansion_index`); otherwise the graph's
    index, if any, is kept. ``shared``: what the build's index selections share. Out of core
    (``plan``), the level's own index has on-disk lists.
    """
    graph = level.knn
    ran = graph.spec or config.knn  # what ran, ``--knn auto`` resolved
    index, entry = None, None
    if graph.index is None and config.expansion_index == AUTO:
        lists = ondisk_lists(stage, plan, stage.level_ivfdata_path(level.number))
        index, entry = expansion_index(level.rows, config, level.number, shared, lists)
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
            dtype=config.level_dtype,
        )
        saved = stage.levels[-1]  # the auto choice's record (Staging.save_level predates it)
        saved.recall_target, saved.below_target = entry.recall_target, entry.below_target
        saved.candidates, saved.skipped = entry.candidates, entry.skipped
        saved.selection_timings_s = entry.selection_timings_s
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
            dtype=config.level_dtype,
        )


def workload(
    n: int,
    d: int,
    params: AqeParams,
    knn_spec: KnnSpec,
    block_size: int,
    serving_spec: ServingSpec | None,
    expansion_index: bool = False,
) -> budget.Workload:
    """What an expansion (and, with ``serving_spec``, a build) will hold, for the budget's plan.

    ``expansion_index``: levels after an exact graph get an index of their own where ``auto``
    picks one (:func:`~index_builder.serving.expansion_index`).
    """
    k = aqe.effective_qe_k(params.qe_k, n)
    method = knn_spec.method
    if method.lower() == AUTO:  # as graph_auto resolves it
        method = EXACT if n <= GRAPH_EXACT_MAX_N else f"IVF{graph_nlist(n)},Flat"
    knn = None if method.lower() in (EXACT, "flat") else index_size(method, n, d, knn_spec.train_size)
    if knn is None and serving_spec is not None and expansion_index:
        method = choose_serving_method(n, d, serving_spec.memory_budget_gib, serving_spec.exact_max_n)[0]
        knn = None if method == "exact" else index_size(method, n, d)
    serving = None
    if serving_spec is not None:
        method = serving_spec.method
        if method.lower() == AUTO:
            method = choose_serving_method(n, d, serving_spec.memory_budget_gib, serving_spec.exact_max_n)[0]
            if method == "exact":  # out of core, auto falls back to IVF (serving.py, flat_limit)
                method = choose_serving_method(n, d, serving_spec.memory_budget_gib, 0)[0]
        serving = index_size(method, n, d, extra=16)
        if method.lower() in (EXACT, "flat"):  # out of core: written in blocks and mapped (flat_file)
            serving = replace(serving, in_memory_only=None)
    ivfs = [s for s in (knn, serving) if s is not None and s.nlist]
    return budget.Workload(
        n=n,
        d=d,
        k=k,
        workers=worker_count(),
        block_size=block_size,
        knn_index_bytes=knn.bytes if knn else 0,
        knn_in_memory_only=knn.in_memory_only if knn else None,
        serving_index_bytes=serving.bytes if serving else 0,
        serving_in_memory_only=serving.in_memory_only if serving else None,
        train_rows=max((s.train_rows for s in ivfs), default=0),
        nlist=max((s.nlist for s in ivfs), default=0),
        code_size=max((s.code_size for s in ivfs), default=0),
        nprobe=(knn_spec.nprobe or 1) if knn is not None and knn_spec.batch_lists is not False else 0,
    )


def array_store(stage: artifact.Staging, plan: budget.Plan, config: BuildConfig) -> ArrayStore:
    """RAM when the plan is resident; else memmaps, the levels written at their final paths."""
    if plan.resident:
        return ArrayStore()
    store = ArrayStore(stage.scratch_dir())
    for t in range(config.params.qe_times):
        if config.level_dtype == "float32":
            store.place(f"level_{t}", stage.level_rows_path(t))
        store.place(f"level_{t}_norms", stage.level_norms_path(t))
        store.place(f"level_{t}.ivfdata", stage.level_ivfdata_path(t))
    return store


def ondisk_lists(stage: artifact.Staging, plan: budget.Plan | None, ivfdata: Path) -> OnDiskLists | None:
    """On-disk inverted lists at ``ivfdata`` when the plan is out of core, else None."""
    if plan is None or plan.resident:
        return None
    return OnDiskLists(ivfdata, stage.scratch_dir(), plan.shard_rows)


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
    if serves_exactly(serving, u.shape[0], u.shape[1]):
        return None  # nothing to measure: exact search, asked for or what ``auto`` picks when small
    levels = stage.load_levels(u.shape[0], u.shape[1])
    qe_k, alpha = report.effective_qe_k, config.params.alpha
    if checks is not None and config.quality is not None and config.quality.queries is not None:
        return expanded_queries(levels, qe_k, alpha, raw=checks.xq[: serving.recall_sample])
    return expanded_queries(
        levels, qe_k, alpha, rows=sample_rows(u.shape[0], serving.recall_sample, serving.seed)
    )
