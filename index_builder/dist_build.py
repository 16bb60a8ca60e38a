"""The build job on a Dask cluster: the client plans and publishes, the workers do the rest.

The same phases and the same published result as :func:`index_builder.build.build`; every
heavy phase (read, kNN, expansion, per-level and serving indexes) runs as tasks
(:mod:`index_builder.dist_expand`, :mod:`index_builder.dist_knn`), the index phases each in
one task that saves through the artifact module's staging methods and returns its manifest
entry. The client holds task lists and manifest entries only (and, with the quality gate,
ranks its sample over the memory-mapped rows). IVF indexes built on workers put their lists on
disk, so a worker holds one shard of them at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss

from aqe_retrieval import artifact
from aqe_retrieval.errors import InputError, KnnConfigError
from index_builder import budget
from index_builder.build import gate_spec, input_record, publish, save_level
from index_builder.cluster import TASK_SHARE, connect, open_rows, pinned_threads, run_tasks, worker_memory
from index_builder.config import BuildConfig
from index_builder.dist_expand import ClusterExpansion, LevelFiles
from index_builder.expansion import Level
from index_builder.gate import quality_gate, quality_inputs
from index_builder.graph_auto import GRAPH_EXACT_MAX_N
from index_builder.inputs import gallery_ids, gallery_metadata, open_embeddings
from index_builder.knn import AUTO, KnnResult
from index_builder.ondisk import OnDiskLists, fill_ondisk
from index_builder.serving import build_serving_index

logger = logging.getLogger(__name__)


def worker_plan(worker_bytes: int, d: int, block: int) -> budget.Plan:
    """An out-of-core plan for one task: on-disk IVF lists in shards that fit ``worker_bytes``."""
    shard = max(1, worker_bytes // 2 // (8 * d + 16))
    return budget.Plan(
        budget.Budget(worker_bytes, "cluster worker share"), False, 0, 0, block, 256, block, 1024, shard
    )


def save_level_task(
    stage: artifact.Staging, files: LevelFiles, config: BuildConfig, plan: budget.Plan
) -> artifact.LevelEntry:
    """Stage one level (rows at their final paths, its index) on a worker; returns its entry."""
    with pinned_threads():
        rows, norms = open_rows(files.rows), open_rows(files.norms)
        index = None
        if files.index is not None and files.assign is not None:
            index = faiss.read_index(str(files.index))  # trained, empty
            lists = OnDiskLists(stage.level_ivfdata_path(files.number), stage.scratch_dir(), plan.shard_rows)
            fill_ondisk(index, rows, lists, coarse=open_rows(files.assign)[:, 0])
        graph = KnnResult(open_rows(files.graph_ids), None, files.recall, files.recall_sample, 0.0, index)  # type: ignore[arg-type]
        save_level(stage, Level(files.number, rows, norms, graph), config, plan=plan)
        return stage.levels[-1]


def serving_task(
    stage: artifact.Staging, expanded: Path, config: BuildConfig, plan: budget.Plan
) -> artifact.ServingIndexEntry:
    """Build and stage the serving index over the normalised expanded rows on a worker."""
    with pinned_threads():
        u = open_rows(expanded)
        lists = OnDiskLists(stage.serving_ivfdata_path(), stage.scratch_dir(), plan.shard_rows)
        index, entry = build_serving_index(
            u, config.serving, plan.block_size, False, lists=lists, flat_limit=plan.budget.bytes
        )
        stage.save_serving_index(index, entry)
        return stage.serving


def resolve_auto_graph(config: BuildConfig, n: int) -> BuildConfig:
    """``--knn auto`` on a cluster: exact while it is cheap; above that an explicit graph is asked for.

    The nprobe tuning of :mod:`index_builder.graph_auto` runs on one machine only, so a large
    gallery built on a cluster names its IVF graph (``--knn IVF<nlist>,Flat --nprobe N``).
    """
    if config.knn.method.lower() != AUTO:
        return config
    if n <= GRAPH_EXACT_MAX_N:
        return replace(config, knn=replace(config.knn, method="exact"))
    raise KnnConfigError(
        f"--knn auto on a cluster is exact up to {GRAPH_EXACT_MAX_N} rows; for {n} rows give the "
        "graph explicitly, e.g. --knn IVF4096,Flat --nprobe 64 (its recall is still measured)"
    )


def build_on_cluster(config: BuildConfig) -> artifact.Manifest:
    """:func:`~index_builder.build.build` with its heavy phases on ``config.cluster``."""
    assert config.cluster is not None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = open_embeddings(config.gallery)
    n, d = source.n, source.d
    ids = gallery_ids(source, config.ids)
    metadata = gallery_metadata(source, config.metadata)
    config = resolve_auto_graph(config, n)
    logged = artifact.list_changes(config.root) if config.changes else []
    if logged:
        raise InputError(
            f"{config.root}: {len(logged)} logged add/delete change(s); a cluster build does not fold "
            "them in yet: build without --cluster, or clear them once --gallery holds them "
            "(index-builder changes clear), or pass --no-changes"
        )
    assert config.cluster is not None
    checks = quality_inputs(config.quality, source, metadata) if config.quality else None
    input_info = input_record(config, source)
    del source
    timings["inputs"] = time.perf_counter() - t0
    with connect(config.cluster.address) as client:
        spec = config.cluster
        limit = worker_memory(client)
        if limit is not None:
            spec = type(spec)(**{**spec.__dict__, "worker_bytes": limit // TASK_SHARE})
        logger.info(
            "gallery %d x %d on cluster %s: %s a task",
            n,
            d,
            spec.address,
            budget.format_size(spec.worker_bytes),
        )
        plan = worker_plan(spec.worker_bytes, d, spec.rows_for(d))
        with artifact.staging(config.root) as stage:
            t1 = time.perf_counter()
            scratch = stage.scratch_dir()
            level_paths = [
                (
                    stage.level_rows_path(t)
                    if config.level_dtype == "float32"
                    else scratch / f"level_{t}.npy",
                    stage.level_norms_path(t),
                )
                for t in range(config.params.qe_times)
            ]
            expansion = ClusterExpansion(
                client,
                config.gallery,
                n,
                d,
                config.params,
                config.knn,
                spec,
                scratch,
                level_paths,
                config.show_progress,
            )
            for files in expansion:
                entry = run_tasks(
                    client, f"level {files.number} index", save_level_task, [(stage, files, config, plan)]
                )[0]
                stage.levels.append(entry)
            report = expansion.report
            timings["expand"] = time.perf_counter() - t1
            timings["read"] = report.read_seconds
            timings["knn"] = sum(r.knn_seconds for r in report.rounds)
            t2 = time.perf_counter()
            expanded = expansion.expanded[0]
            stage.serving = run_tasks(
                client, "serving index", serving_task, [(stage, expanded, config, plan)], None
            )[0]
            timings["serving_index"] = time.perf_counter() - t2
            quality = None
            if config.quality is not None and checks is not None:
                t4 = time.perf_counter()
                u: Any = open_rows(expanded)
                quality = quality_gate(stage, u, report, config.params.alpha, gate_spec(config), checks)
                timings["quality"] = time.perf_counter() - t4
                del u
            return publish(stage, config, report, input_info, timings, quality, ids, metadata, started=t0)
