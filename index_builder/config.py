"""What one build is asked to do: the build, serving-index and quality-gate settings, validated.

Each model refuses bad values on construction, so a build fails before any heavy work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aqe_retrieval.manifest import LEVEL_DTYPES
from index_builder.cluster import ClusterSpec
from index_builder.expansion import DEFAULT_BLOCK_SIZE, AqeParams
from index_builder.inputs import ParquetColumns
from index_builder.knn import KnnSpec
from index_builder.serving_auto import KINDS as SERVING_KINDS
from index_builder.urls import Location

AUTO = "auto"
AUTO_EXACT_MAX_N = 10_000
"""``auto`` serves exactly (flat) up to this many rows, if they fit the memory budget, without
trying other indexes (a flat scan of 10,000 x 256 takes about 0.3 ms); above, it measures."""
SERVING_RECALL_TARGET = 0.97
AUTO_NPROBE_LADDER = (16, 32, 64, 128, 256, 512)
"""nprobe values ``auto`` tries, smallest first, until recall@k reaches the target."""
EXPANSION_INDEXES = ("auto", "exact")
"""``expansion_index`` values: what online expansion searches in a level after an exact graph."""


@dataclass(frozen=True)
class ServingSpec:
    """The serving index over the expanded rows: ``auto`` (default), ``exact`` or a FAISS factory string.

    ``auto`` picks exact (flat) search for galleries up to ``exact_max_n`` rows, else the
    fastest of the ``candidates`` kinds whose recall@k on held-out, online-expanded queries
    reaches ``recall_target`` within ``memory_budget_gib`` (:mod:`index_builder.serving_auto`);
    with ``nprobe`` given, ``IVF<nlist>`` with the finest storage that fits
    (:func:`index_builder.serving.choose_serving_method`).
    """

    method: str = AUTO
    nprobe: int | None = None
    ef_search: int | None = None
    recall_k: int = 10
    recall_sample: int = 1000
    seed: int = 0
    memory_budget_gib: float = 4.0
    recall_target: float = SERVING_RECALL_TARGET
    exact_max_n: int = AUTO_EXACT_MAX_N
    candidates: tuple[str, ...] = SERVING_KINDS

    def __post_init__(self) -> None:
        unknown = set(self.candidates) - set(SERVING_KINDS)
        if unknown or not self.candidates:
            raise ValueError(f"candidates must be among {SERVING_KINDS}, got {self.candidates!r}")
        if not self.memory_budget_gib > 0:
            raise ValueError(f"memory_budget_gib must be > 0, got {self.memory_budget_gib}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.exact_max_n < 0:
            raise ValueError(f"exact_max_n must be >= 0, got {self.exact_max_n}")


@dataclass(frozen=True)
class GateSpec:
    """Thresholds a build must meet to be published (``None``: not checked)."""

    min_map_gain: float | None = None
    min_graph_recall: float | None = None
    graph_recall_target: float | None = None
    """Set by the build from ``--graph-recall-target``: a graph below it is refused too."""


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

    gallery: Location
    """The input: a local path or an fsspec URL (:mod:`index_builder.urls`)."""
    root: Path
    ids: Path | None = None
    metadata: Path | None = None
    columns: ParquetColumns = field(default_factory=ParquetColumns)
    params: AqeParams = field(default_factory=AqeParams)
    knn: KnnSpec = field(default_factory=KnnSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    block_size: int = DEFAULT_BLOCK_SIZE
    keep: int = 3
    threads: int | None = None
    show_progress: bool | None = None
    quality: QualitySpec | None = None
    expansion_index: str = AUTO
    memory_budget: int | None = None
    """Bytes the build may use (``--memory-budget``); None: the container's limit or free memory."""
    level_dtype: str = "float32"
    """dtype of the stored level rows online expansion reads: float32 or float16."""
    cluster: ClusterSpec | None = None
    """Run the heavy phases on this Dask cluster (``--cluster``); None: in this process."""
    changes: bool = True  # fold the root's change log (``index_builder.changes``) into the gallery

    def __post_init__(self) -> None:
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(f"memory_budget must be >= 1 byte, got {self.memory_budget}")
        if self.level_dtype not in LEVEL_DTYPES:
            raise ValueError(f"level_dtype must be one of {LEVEL_DTYPES}, got {self.level_dtype!r}")
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
