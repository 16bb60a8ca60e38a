"""The expansion on a Dask cluster: read, kNN and expand as tasks over row ranges and memmaps.

The client preallocates every array of N rows as a ``.npy`` memmap in the staging directory and
hands out row ranges; workers open them (``r+``) and write their ranges. A task writes only
rows it computes from inputs no task changes (level ``t`` from level ``t - 1``), so a rerun
writes the same bytes. Per round::

    read+normalise   one task per row range: source rows (a path or fsspec URL) -> level_0
    kNN              dist_knn: tile pairs or train / assign / list groups, then merges
    expand           one task per row range: level t-1 rows, norms, graph -> level t, normalised

The client holds none of these arrays: only task lists, list counts and a recall figure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqe_retrieval import aqe
from index_builder import dist_knn
from index_builder.cluster import ClusterSpec, open_rows, pinned_threads, ranges, run_tasks
from index_builder.expansion import EXPAND_CHUNK, AqeParams, ExpansionReport, RoundReport, expand_block
from index_builder.inputs import bad_rows, open_embeddings, raise_for_bad_rows
from index_builder.knn import KnnSpec
from index_builder.urls import Location

logger = logging.getLogger(__name__)


def read_task(
    gallery: Location, lo: int, hi: int, rows_path: Path, norms_path: Path
) -> tuple[list[int], list[int]]:
    """Rows [lo, hi) of the gallery, normalised into the level-0 memmaps; (non-finite, zero) rows."""
    with pinned_threads():
        block = open_embeddings(gallery).take(np.arange(lo, hi))
        bad = bad_rows(block, lo)
        if bad[0] or bad[1]:
            return bad
        rows, norms = open_rows(rows_path, "r+"), open_rows(norms_path, "r+")
        rows[lo:hi], norms[lo:hi] = aqe.normalize_rows(block)
        rows.flush()
        norms.flush()
        return [], []


def expand_task(
    prev: tuple[Path, Path], ids_path: Path, alpha: float, lo: int, hi: int, out: tuple[Path, Path]
) -> int:
    """Rows [lo, hi) expanded over the graph (:func:`expand_block`), normalised, into ``out``."""
    with pinned_threads():
        u, norms, ids = open_rows(prev[0]), open_rows(prev[1]), open_rows(ids_path)
        rows, out_norms = open_rows(out[0], "r+"), open_rows(out[1], "r+")
        for c0 in range(lo, hi, EXPAND_CHUNK):
            c1 = min(hi, c0 + EXPAND_CHUNK)
            x = expand_block(u, norms, np.asarray(u[c0:c1]), np.asarray(ids[c0:c1]), alpha)
            rows[c0:c1], out_norms[c0:c1] = aqe.normalize_rows(x)
        rows.flush()
        out_norms.flush()
        return hi - lo


@dataclass(frozen=True)
class LevelFiles:
    """One level on disk: its normalised rows, norms, graph, and the IVF graph's index files."""

    number: int
    rows: Path
    norms: Path
    graph_ids: Path
    graph_sims: Path
    index: Path | None = None
    assign: Path | None = None
    recall: float | None = None
    recall_sample: int = 0


def allocate(path: Path, shape: tuple[int, ...], dtype: Any) -> Path:
    """A preallocated ``.npy`` file (header and size) the tasks fill by row ranges."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    del arr
    return path


class ClusterExpansion:
    """:class:`~index_builder.expansion.Expansion` on a cluster: yields :class:`LevelFiles`.

    ``level_paths(t)``: where level t's rows and norms go (the artifact's final paths, or
    scratch); ``scratch``: graphs, parts and the expanded rows (``expanded`` after the last level).
    """

    def __init__(
        self,
        client: Any,
        gallery: Location,
        n: int,
        d: int,
        params: AqeParams,
        knn: KnnSpec,
        spec: ClusterSpec,
        scratch: Path,
        level_paths: list[tuple[Path, Path]],
        show_progress: bool | None = None,
    ) -> None:
        self.client, self.gallery, self.n, self.d = client, gallery, n, d
        self.params, self.knn, self.spec, self.scratch = params, knn, spec, scratch
        self.level_paths, self.show_progress = level_paths, show_progress
        self.report = ExpansionReport(n=n, d=d, effective_qe_k=aqe.effective_qe_k(params.qe_k, n))
        self.expanded = (scratch / "expanded.npy", scratch / "expanded_norms.npy")

    def _run(
        self, label: str, fn: Any, tasks: list[tuple[Any, ...]], weights: list[int] | None = None
    ) -> list:
        return run_tasks(self.client, label, fn, tasks, weights, self.show_progress)

    def __iter__(self) -> Iterator[LevelFiles]:
        """Run the rounds; yield each level (rows, norms, graph on disk) before it is expanded."""
        n, d, k, rows = self.n, self.d, self.report.effective_qe_k, self.spec.rows_for(self.d)
        t0 = time.perf_counter()
        u, norms = self.level_paths[0]
        allocate(u, (n, d), np.float32)
        allocate(norms, (n,), np.float32)
        chunks = ranges(n, rows)
        bad = self._run("read+normalise", read_task, [(self.gallery, lo, hi, u, norms) for lo, hi in chunks])
        nonfinite = sorted(r for b in bad for r in b[0])
        zero = sorted(r for b in bad for r in b[1])
        raise_for_bad_rows(str(self.gallery), nonfinite, zero)
        self.report.read_seconds = time.perf_counter() - t0
        for t in range(1, self.params.qe_times + 1):
            t1 = time.perf_counter()
            level = self.knn_level(t - 1, u, norms, k)
            knn_seconds = time.perf_counter() - t1
            if level.recall is not None:
                logger.info(
                    "round %d: graph recall@%d %.4f on %d rows", t, k, level.recall, level.recall_sample
                )
            yield level
            t2 = time.perf_counter()
            out = self.level_paths[t] if t < self.params.qe_times else self.expanded
            allocate(out[0], (n, d), np.float32)
            allocate(out[1], (n,), np.float32)
            tasks = [((u, norms), level.graph_ids, self.params.alpha, lo, hi, out) for lo, hi in chunks]
            self._run(f"round {t}/{self.params.qe_times} expand", expand_task, tasks)
            self.report.rounds.append(
                RoundReport(t, knn_seconds, time.perf_counter() - t2, level.recall, level.recall_sample)
            )
            for path in (level.graph_ids, level.graph_sims, level.assign):
                if path is not None:
                    path.unlink(missing_ok=True)
            u, norms = out

    def knn_level(self, level: int, u: Path, norms: Path, k: int) -> LevelFiles:
        """The kNN graph of level ``level``'s rows, written by merge tasks into two memmaps."""
        n, d, spec, scratch = self.n, self.d, self.spec, self.scratch
        ids_path = allocate(scratch / f"graph_{level}_ids.npy", (n, k), np.int64)
        sims_path = allocate(scratch / f"graph_{level}_sims.npy", (n, k), np.float32)
        parts = scratch / f"parts_{level}"
        parts.mkdir(exist_ok=True)
        label = f"round {level + 1}/{self.params.qe_times} kNN"
        block = spec.rows_for(d)
        files = LevelFiles(level, u, norms, ids_path, sims_path)
        if self.knn.exact:
            tile = spec.tile_for(d, k)
            tasks, by_block = dist_knn.exact_tasks(n, tile, parts)
            weights = [(a[1] - a[0]) * (b[1] - b[0]) for a, b, _ in tasks]
            self._run(label, dist_knn.tile_pair_task, [(u, a, b, k, p) for a, b, p in tasks], weights)
            merges = [(by_block[lo], u, sims_path, ids_path, lo, hi, k, block) for lo, hi in ranges(n, tile)]
        else:
            index_path = scratch / f"level_{level}_trained.faiss"
            train = dist_knn.train_rows(self.knn, d, spec.worker_bytes)
            nlist = self._run("IVF training", dist_knn.train_task, [(u, self.knn, index_path, train)])[0]
            if train < min(n, 39 * nlist):
                logger.warning(
                    "IVF training on %d rows (%.0f a list, FAISS asks for 39): what a worker's share "
                    "of %d bytes holds; give workers more memory for the single-process sample",
                    train,
                    train / nlist,
                    spec.worker_bytes,
                )
            probes = min(self.knn.nprobe or 1, nlist)
            assign = allocate(scratch / f"assign_{level}.npy", (n, probes), np.int32)
            counts = self._run(
                "coarse assignment",
                dist_knn.assign_task,
                [(index_path, u, assign, lo, hi, probes) for lo, hi in ranges(n, block)],
            )
            members = np.sum([c[0] for c in counts], axis=0)
            probers = np.sum([c[1] for c in counts], axis=0)
            groups = dist_knn.list_groups(members, probers, d, k, spec.group_limit(d, k))
            logger.info("%s: %d lists in %d groups", label, nlist, len(groups))
            group_parts = [parts / f"lists_{l0}_{l1}" for l0, l1 in groups]
            tasks = [
                (u, assign, g, k, block, spec.tile_for(d, k), p)
                for g, p in zip(groups, group_parts, strict=True)
            ]
            self._run(
                label, dist_knn.list_group_task, tasks, [int(probers[l0:l1].sum()) + 1 for l0, l1 in groups]
            )
            merges = [(group_parts, u, sims_path, ids_path, lo, hi, k, block) for lo, hi in ranges(n, block)]
            files = LevelFiles(level, u, norms, ids_path, sims_path, index_path, assign)
        short = sum(self._run(f"{label} merge", dist_knn.merge_task, merges))
        if short:
            logger.warning("%d rows got fewer than %d neighbours; searched exactly", short, k)
        for part in parts.iterdir():
            for f in part.iterdir():
                f.unlink()
            part.rmdir()
        parts.rmdir()
        if not self.knn.exact:
            recall, sample = self._run(
                "graph recall", dist_knn.recall_task, [(u, ids_path, n, k, self.knn, block)]
            )[0]
            files = LevelFiles(
                level, u, norms, ids_path, sims_path, files.index, files.assign, recall, sample
            )
        return files
