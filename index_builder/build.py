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

from aqe_retrieval import aqe, artifact
from aqe_retrieval.errors import InputError, QualityGateError
from aqe_retrieval.faiss_search import exact_knn, search_parameters
from aqe_retrieval.online import expand_online, gallery_level
from index_builder.expansion import DEFAULT_BLOCK_SIZE, AqeParams, Expansion, Level
from index_builder.inputs import fingerprint, open_embeddings, read_ids, read_metadata
from index_builder.knn import (
    KnnSpec,
    build_index,
    sample_rows,
    set_recall,
)
from index_builder.progress import progress
from index_builder.quality import (
    GateSpec,
    Labels,
    cosine_metrics,
    gate_check,
    labels_from_columns,
)

logger = logging.getLogger(__name__)


AUTO = "auto"
AUTO_EXACT_MAX_N = 200_000
"""``auto`` serves exactly (flat) up to this many rows, if they fit the memory budget."""
AUTO_NPROBE_LADDER = (16, 32, 64, 128, 256, 512)
"""nprobe values ``auto`` tries, smallest first, until recall@k reaches the target."""
EXPANSION_INDEXES = ("auto", "exact")
"""``expansion_index`` values: what online expansion searches in a level after an exact graph."""


@dataclass(frozen=True)
class ServingSpec:
    """The serving index over the expanded rows: ``exact``, ``auto`` or a FAISS factory string.

    ``auto`` picks exact (flat) search for galleries up to ``AUTO_EXACT_MAX_N`` rows, else
    ``IVF<nlist>`` (nlist ~ 4 sqrt(N)) with the finest storage (Flat, SQ8, PQ) that fits
    ``memory_budget_gib``, and the smallest nprobe whose measured recall@k reaches
    ``recall_target`` (unless ``nprobe`` is given). See :func:`choose_serving_method`.
    """

    method: str = "exact"
    nprobe: int | None = None
    ef_search: int | None = None
    recall_k: int = 10
    recall_sample: int = 1000
    seed: int = 0
    memory_budget_gib: float = 4.0
    recall_target: float = 0.95

    def __post_init__(self) -> None:
        if not self.memory_budget_gib > 0:
            raise ValueError(f"memory_budget_gib must be > 0, got {self.memory_budget_gib}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")


@dataclass(frozen=True)
class QualitySpec:
    """The build's quality check: labelled queries, and the thresholds of the gate.

    Queries come from ``queries`` (a .npy) with ``query_labels`` (a CSV with the pid and camid
    columns), or, without them, ``sample`` gallery rows used as queries (the Market-1501 rule
    then ignores the query's own row: same pid, same camid). Gallery labels come from the build's
    metadata columns ``pid_column`` and ``camid_column``.
    """

    gate: GateSpec = field(default_factory=GateSpec)
    queries: Path | None = None
    query_labels: Path | None = None
    sample: int = 500
    pid_column: str = "pid"
    camid_column: str = "camid"
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
    quality: QualitySpec | None = None
    expansion_index: str = AUTO

    def __post_init__(self) -> None:
        if self.expansion_index not in EXPANSION_INDEXES:
            raise ValueError(
                f"expansion_index must be one of {EXPANSION_INDEXES}, got {self.expansion_index!r}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.quality is not None and self.metadata is None:
            raise ValueError("the quality check needs --metadata with the pid and camid columns")


def build(config: BuildConfig) -> artifact.Manifest:
    """Run the whole job and publish a new version under ``config.root``; returns its manifest."""
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = open_embeddings(config.gallery)
    ids = read_ids(config.ids, source.n) if config.ids else None
    metadata = read_metadata(config.metadata, source.n) if config.metadata else {}
    quality_inputs = _quality_inputs(config.quality, source, metadata) if config.quality else None
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
        for level in expansion:
            _save_level(stage, level, config)
        del level  # staged: the last level's rows and graph must not outlive the expansion
        expanded, report = expansion.expanded, expansion.report
        timings["expand"] = time.perf_counter() - t1
        timings["read"] = report.read_seconds
        timings["knn"] = sum(r.knn_seconds for r in report.rounds)

        t2 = time.perf_counter()
        aqe.normalize_rows_inplace(expanded, config.block_size)
        u = expanded
        index, serving_entry = build_serving_index(u, config.serving, config.block_size, config.show_progress)
        stage.save_serving_index(index, serving_entry)
        del index
        timings["serving_index"] = time.perf_counter() - t2
        quality = None
        if quality_inputs is not None:
            t4 = time.perf_counter()
            quality = _quality_gate(stage, u, report, config, *quality_inputs)
            timings["quality"] = time.perf_counter() - t4
        del u

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
            knn=_knn_record(config.knn),
            graph_recall=report.graph_recall,
            graph_recall_sample=max((r.recall_sample for r in report.rounds), default=0),
            input=input_info,
            timings_s={k: round(v, 3) for k, v in timings.items()},
            quality=quality,
        )
    logger.info("publish took %.1fs", time.perf_counter() - t3)
    return manifest


def _save_level(stage: artifact.Staging, level: Level, config: BuildConfig) -> None:
    """Stage one level with the index online expansion searches in it: its own, the graph's, or none."""
    graph = level.knn
    index, entry = None, None
    if graph.index is None and config.expansion_index == AUTO:
        index, entry = expansion_index(level.rows, config, level.number)
    if entry is not None:  # an index of its own for online expansion
        stage.save_level(
            level.number,
            level.rows,
            level.norms,
            index=index,
            index_type=entry.spec,
            nprobe=entry.nprobe,
            recall_at_k=entry.recall_at_k,
            recall_k=entry.recall_k,
        )
    else:  # the graph's index, if any
        stage.save_level(
            level.number,
            level.rows,
            level.norms,
            index=graph.index,
            index_type="exact" if graph.index is None else config.knn.method,
            nprobe=config.knn.nprobe,
            ef_search=config.knn.ef_search,
            recall_at_k=graph.recall,
            recall_k=config.params.qe_k,
        )


def _quality_inputs(spec: QualitySpec, source, metadata: dict[str, np.ndarray]):
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
    return xq, q_labels, g_labels


def _quality_gate(
    stage, u: np.ndarray, report, config: BuildConfig, xq: np.ndarray, q_labels: Labels, g_labels: Labels
) -> dict[str, Any]:
    """mAP with and without expansion on the staged version; raises if the gate refuses it."""
    spec = config.quality
    assert spec is not None
    levels = [
        gallery_level(lv.rows, lv.norms, lv.index, lv.entry.nprobe, lv.entry.ef_search)
        for lv in stage.load_levels(u.shape[0], u.shape[1])
    ]
    raw = cosine_metrics(xq, levels[0].rows, q_labels, g_labels)
    eq = expand_online(xq, levels, report.effective_qe_k, config.params.alpha)
    expanded = cosine_metrics(eq, u, q_labels, g_labels)
    record = gate_check(raw, expanded, report.graph_recall, spec.gate)
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


def build_serving_index(
    u: np.ndarray,
    spec: ServingSpec,
    block_size: int,
    show_progress: bool | None = None,
    what: str = "serving index",
) -> tuple[Any, artifact.ServingIndexEntry]:
    """The index searched by the service over ``u`` (n, d) normalised expanded rows.

    ``auto`` is resolved first (:func:`choose_serving_method`); the entry records what was
    chosen. For an approximate index, recall@k against exact search is measured on a sample of
    rows used as queries; IVF indexes get a direct map (8 bytes a row) so that the service can
    reconstruct rows for its exact fallback under filters.
    """
    n, d = u.shape
    nprobe = spec.nprobe
    method = spec.method
    if method.lower() == AUTO:
        method, reason = choose_serving_method(n, d, spec.memory_budget_gib)
        logger.info("%s auto: %s (%s)", what, method, reason)
    knn_spec = KnnSpec(method=method, seed=spec.seed)
    with progress(what, n, enabled=show_progress) as update:
        index = build_index(u, knn_spec, block_size, update)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    entry = artifact.ServingIndexEntry(
        spec=method, index_type=_describe(index), nprobe=nprobe, ef_search=spec.ef_search
    )
    if not knn_spec.exact:
        k = min(spec.recall_k, n)
        rows = sample_rows(n, spec.recall_sample, spec.seed)
        xq = np.ascontiguousarray(u[rows])
        truth = exact_knn(xq, u, k)[1]

        def recall(nprobe: int | None) -> float:
            params = search_parameters(index, nprobe, spec.ef_search)
            return set_recall(index.search(xq, k, params=params)[1], truth)

        if spec.method.lower() == AUTO and nprobe is None and ivf is not None:
            nprobe, entry.recall_at_k = _tune_nprobe(recall, ivf.nlist, spec.recall_target, what)
            entry.nprobe = nprobe
        else:
            entry.recall_at_k = recall(nprobe)
        entry.recall_k, entry.recall_sample = k, len(rows)
        logger.info(
            "%s %s (nprobe %s): recall@%d %.4f on %d queries",
            what,
            method,
            nprobe,
            k,
            entry.recall_at_k,
            len(rows),
        )
    return index, entry


def expansion_index(
    rows: np.ndarray, config: BuildConfig, level: int
) -> tuple[Any, artifact.ServingIndexEntry | None]:
    """The index online expansion searches in a level whose graph was exact, or (None, None).

    An exact graph leaves no index, and a flat scan of every row per query costs what exact
    serving does (4 ms at 100,000 x 256). Above ``AUTO_EXACT_MAX_N`` rows (or when flat rows do
    not fit the serving memory budget) this builds the index ``--serving-index auto`` would,
    with the smallest nprobe whose recall of the top ``qe_k - 1`` neighbours (what expansion
    takes) reaches the serving recall target, measured against exact search on a sample.
    """
    n, d = rows.shape
    if choose_serving_method(n, d, config.serving.memory_budget_gib)[0] == "exact":
        return None, None
    spec = ServingSpec(
        method=AUTO,
        recall_k=max(config.params.qe_k - 1, 1),
        recall_sample=config.serving.recall_sample,
        seed=config.serving.seed,
        memory_budget_gib=config.serving.memory_budget_gib,
        recall_target=config.serving.recall_target,
    )
    return build_serving_index(
        np.ascontiguousarray(rows, dtype=np.float32),
        spec,
        config.block_size,
        config.show_progress,
        what=f"level {level} expansion index",
    )


def choose_serving_method(n: int, d: int, memory_budget_gib: float) -> tuple[str, str]:
    """The serving index ``auto`` picks for n rows of dimension d: (factory string, reason).

    Exact (flat, ``4 n d`` bytes) up to ``AUTO_EXACT_MAX_N`` rows; above, or when flat does not
    fit, ``IVF<nlist>`` with nlist the power of two nearest ``4 sqrt(n)`` (at most n / 39, the
    rows k-means needs per list) and the finest storage within the budget: Flat (``4 d`` bytes a
    row), SQ8 (``d``), PQ<m> (``m``), each plus 16 bytes a row (list id, direct map). Raises
    ``ValueError`` when even the smallest PQ does not fit.
    """
    budget = memory_budget_gib * 2**30
    flat = 4 * n * d
    if n <= AUTO_EXACT_MAX_N and flat <= budget:
        return "exact", f"{n} rows <= {AUTO_EXACT_MAX_N}: flat search, {flat / 2**30:.2f} GiB"
    nlist = int(2 ** round(np.log2(max(4 * np.sqrt(n), 1))))
    nlist = min(nlist, 2 ** int(np.log2(max(n // 39, 1))))  # a power of two <= n / 39
    why = (
        f"{n} rows > {AUTO_EXACT_MAX_N}"
        if flat <= budget
        else (f"flat needs {flat / 2**30:.2f} GiB > budget {memory_budget_gib} GiB")
    )
    storages = [("Flat", 4 * d), ("SQ8", d)]
    storages += [(f"PQ{m}", m) for m in range(d, 0, -1) if d % m == 0 and m < d and m <= 64]
    for name, row_bytes in storages:
        size = n * (row_bytes + 16) + nlist * d * 4
        if size <= budget:
            return (
                f"IVF{nlist},{name}",
                f"{why}; IVF{nlist},{name} needs {size / 2**30:.2f} GiB of {memory_budget_gib}",
            )
    raise ValueError(
        f"serving memory budget {memory_budget_gib} GiB is too small for {n} rows of "
        f"dimension {d} (the smallest IVF,PQ needs {size / 2**30:.2f} GiB)"
    )


def _tune_nprobe(recall, nlist: int, target: float, what: str) -> tuple[int, float]:
    """The smallest nprobe of the ladder whose ``recall(nprobe)`` reaches ``target``."""
    ladder = [p for p in AUTO_NPROBE_LADDER if p < nlist] + [nlist]
    for nprobe in ladder:
        value = recall(nprobe)
        if value >= target:
            return nprobe, value
    logger.warning("%s: recall %.4f < target %.2f even with all %d lists probed", what, value, target, nlist)
    return nprobe, value


def _describe(index) -> str:
    return type(faiss.downcast_index(index)).__name__


def _knn_record(spec: KnnSpec) -> dict[str, Any]:
    return {
        "method": "exact" if spec.exact else spec.method,
        "nprobe": spec.nprobe,
        "ef_search": spec.ef_search,
        "train_size": spec.train_size,
        "recall_sample": spec.recall_sample,
        "seed": spec.seed,
    }
