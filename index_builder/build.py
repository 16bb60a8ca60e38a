"""The build job: read the gallery, expand it, index it, publish a version.

Every input check runs before the heavy work, and nothing is published unless every phase
succeeded: a failure anywhere leaves ``current`` and the previous versions as they were.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index_builder import aqe, artifact
from index_builder.expansion import DEFAULT_BLOCK_SIZE, AqeParams, expand_source
from index_builder.inputs import fingerprint, open_embeddings, read_ids, read_metadata
from index_builder.knn import (
    KnnResult,
    KnnSpec,
    build_index,
    exact_knn,
    sample_rows,
    search_parameters,
    set_recall,
)
from index_builder.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSpec:
    """The serving index over the expanded rows: ``exact`` or a FAISS factory string."""

    method: str = "exact"
    nprobe: int | None = None
    ef_search: int | None = None
    recall_k: int = 10
    recall_sample: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class BuildConfig:
    """Everything one build needs; validated on construction."""

    gallery: Path
    root: Path
    ids: Path | None = None
    metadata: Path | None = None
    params: AqeParams = field(default_factory=AqeParams)
    knn: KnnSpec = field(default_factory=KnnSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    block_size: int = DEFAULT_BLOCK_SIZE
    keep: int = 3
    threads: int | None = None
    show_progress: bool | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def build(config: BuildConfig) -> artifact.Manifest:
    """Run the whole job and publish a new version under ``config.root``; returns its manifest."""
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = open_embeddings(config.gallery)
    ids = read_ids(config.ids, source.n) if config.ids else None
    metadata = read_metadata(config.metadata, source.n) if config.metadata else {}
    input_files = [*source.paths, *(p for p in (config.ids, config.metadata) if p)]
    input_info = {
        "gallery": str(config.gallery),
        "ids": str(config.ids) if config.ids else None,
        "metadata": str(config.metadata) if config.metadata else None,
        "dtype": str(source.dtype),
        "shards": len(source.paths),
        "fingerprint": fingerprint(input_files),
    }
    timings["inputs"] = time.perf_counter() - t0
    logger.info("gallery: %d x %d %s from %d file(s)", source.n, source.d, source.dtype,
                len(source.paths))

    with artifact.staging(config.root) as stage:

        def save_level(level: int, rows: np.ndarray, norms: np.ndarray, knn: KnnResult) -> None:
            stage.save_level(level, rows, norms, index=knn.index,
                             index_type="exact" if knn.index is None else config.knn.method,
                             nprobe=config.knn.nprobe, ef_search=config.knn.ef_search)

        t1 = time.perf_counter()
        expanded, report = expand_source(
            source, config.params, config.knn, block_size=config.block_size,
            on_level=save_level, show_progress=config.show_progress, label=str(config.gallery),
        )
        timings["expand"] = time.perf_counter() - t1
        timings["read"] = report.read_seconds
        timings["knn"] = sum(r.knn_seconds for r in report.rounds)

        t2 = time.perf_counter()
        aqe.normalize_rows_inplace(expanded, config.block_size)
        u = expanded
        index, serving_entry = build_serving_index(u, config.serving, config.block_size,
                                                   config.show_progress)
        stage.save_serving_index(index, serving_entry)
        del index, u
        timings["serving_index"] = time.perf_counter() - t2

        if ids is not None:
            stage.save_ids(ids)
        if metadata:
            stage.save_metadata(metadata)
        t3 = time.perf_counter()
        timings["total"] = t3 - t0
        manifest = stage.publish(
            keep=config.keep,
            n=source.n, d=source.d, qe_k=config.params.qe_k, effective_qe_k=report.effective_qe_k,
            alpha=config.params.alpha, qe_times=config.params.qe_times,
            knn=_knn_record(config.knn), graph_recall=report.graph_recall,
            graph_recall_sample=max((r.recall_sample for r in report.rounds), default=0),
            input=input_info, timings_s={k: round(v, 3) for k, v in timings.items()},
        )
    logger.info("publish took %.1fs", time.perf_counter() - t3)
    return manifest


def build_serving_index(
    u: np.ndarray, spec: ServingSpec, block_size: int, show_progress: bool | None = None
) -> tuple[Any, artifact.ServingIndexEntry]:
    """The index searched by the service over ``u`` (n, d) normalised expanded rows.

    For an approximate index, recall@k against exact search is measured on a sample of rows used
    as queries.
    """
    knn_spec = KnnSpec(method=spec.method, seed=spec.seed)
    with progress("serving index", u.shape[0], enabled=show_progress) as update:
        index = build_index(u, knn_spec, block_size, update)
    entry = artifact.ServingIndexEntry(spec=spec.method, index_type=_describe(index),
                                       nprobe=spec.nprobe, ef_search=spec.ef_search)
    if not knn_spec.exact:
        k = min(spec.recall_k, u.shape[0])
        rows = sample_rows(u.shape[0], spec.recall_sample, spec.seed)
        xq = np.ascontiguousarray(u[rows])
        params = search_parameters(index, spec.nprobe, spec.ef_search)
        _, found = index.search(xq, k, params=params)
        entry.recall_at_k = set_recall(found, exact_knn(xq, u, k)[1])
        entry.recall_k, entry.recall_sample = k, len(rows)
        logger.info("serving index %s: recall@%d %.4f on %d queries", spec.method, k,
                    entry.recall_at_k, len(rows))
    return index, entry


def _describe(index) -> str:
    return type(faiss.downcast_index(index)).__name__


def _knn_record(spec: KnnSpec) -> dict[str, Any]:
    return {"method": "exact" if spec.exact else spec.method, "nprobe": spec.nprobe,
            "ef_search": spec.ef_search, "train_size": spec.train_size,
            "recall_sample": spec.recall_sample, "seed": spec.seed}
