"""The manifest of one index version: what was built, how, from what, and each file's checksum.

Pure data (pydantic models, format version :data:`FORMAT_VERSION`); :mod:`aqe_retrieval.artifact`
owns where the manifest and the files it names live, and reads and writes them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

FORMAT_VERSION = 1
DELTA_FORMAT_VERSION = 2
"""A version published by ``add``/``delete``: base files plus a delta (older readers refuse it)."""
READABLE_FORMATS = (FORMAT_VERSION, DELTA_FORMAT_VERSION)
SERVING_INDEX = "serving.faiss"
LEVEL_DTYPES = ("float32", "float16")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class MetadataColumn(BaseModel):
    name: str
    dtype: str
    file: str


class IndexCandidate(BaseModel):
    """One index configuration an ``auto`` choice measured (fields added after format 1 began)."""

    method: str
    nprobe: int | None = None
    ef_search: int | None = None
    recall_at_k: float | None = None  # on held-out, online-expanded queries, against exact
    ms_per_query: float | None = None  # median of single-query searches, 1 FAISS thread
    bytes: int | None = None  # the index's size in memory


class SkippedCandidate(BaseModel):
    """A candidate an ``auto`` choice did not build, and why (fields added after format 1 began)."""

    method: str
    reason: str
    bytes: int | None = None  # its estimated size in memory


class LevelEntry(BaseModel):
    level: int
    rows: str
    norms: str
    dtype: str = "float32"  # of ``rows``: float32 or float16 (norms are always float32)
    index: str | None = None
    ivfdata: str | None = None  # the on-disk inverted lists of ``index``, if it has them
    index_type: str = "exact"
    nprobe: int | None = None
    ef_search: int | None = None
    recall_at_k: float | None = None  # of ``index`` at ``nprobe`` against exact, on a sample
    recall_k: int | None = None
    # optional since they were added: how ``--expansion-index auto`` chose ``index``
    recall_target: float | None = None
    below_target: bool = False
    candidates: list[IndexCandidate] = Field(default_factory=list)
    skipped: list[SkippedCandidate] = Field(default_factory=list)
    selection_timings_s: dict[str, float] = Field(default_factory=dict)


class ServingIndexEntry(BaseModel):
    file: str = SERVING_INDEX
    ivfdata: str | None = None  # the on-disk inverted lists of ``file``, if it has them
    spec: str = "exact"
    index_type: str = ""
    nprobe: int | None = None
    ef_search: int | None = None
    recall_at_k: float | None = None
    recall_k: int | None = None
    recall_sample: int = 0
    # optional since they were added: what ``auto`` measured and tried
    recall_queries: str | None = None  # "held-out": gallery rows expanded online against the rest
    recall_target: float | None = None
    below_target: bool = False
    ms_per_query: float | None = None
    bytes: int | None = None
    selection_seconds: float | None = None
    candidates: list[IndexCandidate] = Field(default_factory=list)
    skipped: list[SkippedCandidate] = Field(default_factory=list)  # not built: budget, or dominated
    selection_timings_s: dict[str, float] = Field(default_factory=dict)  # by phase of the selection


class GraphEntry(BaseModel):
    """One level's top-``qe_k`` graph: neighbour ids (n, k) int64 and similarities float32."""

    level: int
    ids: str
    sims: str


class DeltaLevel(BaseModel):
    """Rows of one level that differ from the base: view positions, normalised rows, norms."""

    level: int  # 0 .. qe_times; qe_times is the served (fully expanded) level
    pos: str
    rows: str
    norms: str | None = None


class DeltaGraph(BaseModel):
    """Graph rows of one level that differ from the base (ids in the version's own numbering)."""

    level: int
    pos: str
    ids: str
    sims: str


class DeltaEntry(BaseModel):
    """How a version made by ``add``/``delete`` differs from the full build its files came from.

    The version's rows are the base's rows not in ``dead``, in base order, then the appended
    rows; ``levels``/``graphs`` override the rows that changed (cumulative since the base).
    """

    base_version: str
    base_n: int
    dead: str
    appended: int
    ids: str | None = None
    metadata: list[str] = Field(default_factory=list)  # appended rows' columns, as ``metadata``
    levels: list[DeltaLevel] = Field(default_factory=list)
    graphs: list[DeltaGraph] = Field(default_factory=list)

    def file_names(self) -> list[str]:
        """Every file the delta names."""
        names = [self.dead, *self.metadata, *([self.ids] if self.ids else [])]
        for lv in self.levels:
            names += [lv.pos, lv.rows, *([lv.norms] if lv.norms else [])]
        for g in self.graphs:
            names += [g.pos, g.ids, g.sims]
        return names


class Manifest(BaseModel):
    """Everything a loader or a person needs to know about one published version."""

    format_version: int = FORMAT_VERSION
    version: str
    created_at: datetime
    n: int
    d: int
    qe_k: int
    effective_qe_k: int
    alpha: float
    qe_times: int
    knn: dict[str, Any]
    graph_recall: float | None = None
    graph_recall_sample: int = 0
    graph_recall_target: float | None = None
    graph_below_target: bool = False
    levels: list[LevelEntry]
    serving_index: ServingIndexEntry
    ids_file: str | None = None
    metadata: list[MetadataColumn] = Field(default_factory=list)
    files: dict[str, FileEntry]
    input: dict[str, Any] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    software: dict[str, str] = Field(default_factory=dict)
    quality: dict[str, Any] | None = None
    # optional since they were added: the stored graphs, the delta of an add/delete, and the
    # fingerprints of the add/delete operations applied since the last full build
    graphs: list[GraphEntry] = Field(default_factory=list)
    delta: DeltaEntry | None = None
    history: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_stay_inside(self) -> Manifest:
        """Every file the manifest names is a plain name listed (and checksummed) in ``files``."""
        named = [self.serving_index.file, *(c.file for c in self.metadata)]
        named += [self.serving_index.ivfdata] if self.serving_index.ivfdata else []
        named += [n for lv in self.levels for n in (lv.rows, lv.norms, lv.index, lv.ivfdata) if n]
        named += [self.ids_file] if self.ids_file else []
        named += [n for g in self.graphs for n in (g.ids, g.sims)]
        named += self.delta.file_names() if self.delta else []
        for name in [*named, *self.files]:
            if not FILE_NAME_RE.match(name):
                raise ValueError(f"file name {name!r} is not a plain name inside the version")
        bad_dtypes = sorted({lv.dtype for lv in self.levels} - set(LEVEL_DTYPES))
        if bad_dtypes:
            raise ValueError(f"level dtypes {bad_dtypes} are not one of {LEVEL_DTYPES}")
        missing = sorted(set(named) - set(self.files))
        if missing:
            raise ValueError(f"files {missing} have no checksum entry")
        return self
