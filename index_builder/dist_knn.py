"""The kNN graph as Dask tasks over memory-mapped rows: tile pairs (exact) or list groups (IVF).

Every search task writes a *part*: a directory with ``rows`` (m,) int64 ascending, ``sims``
(m, k) float32 and ``ids`` (m, k) int64 (``-inf`` / ``-1`` padded), the partial top-k of those
rows. A merge task per row block folds every part's slice of its rows with a
``faiss.ResultHeap`` and writes them into the graph memmaps; rows left with fewer than k hits
are searched exactly there (as :func:`index_builder.knn.self_knn` does).

* **exact**: one task per tile pair (a, b >= a) of the symmetric kernel: one GEMM, whose rows
  give block a's partial top-k and whose columns give block b's.
* **IVF**: one task trains the index on the seeded sample (:func:`index_builder.knn.build_index`),
  row-range tasks write the coarse assignment (n, nprobe) and count each list's members and
  probers, and each *list group* task (contiguous lists whose members and probers fit a
  worker's share) scores the rows probing its lists against the lists' members.

Parts are written under a temporary name and renamed, so a rerun task replaces nothing half-done.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from aqe_retrieval.faiss_search import exact_knn
from index_builder.cluster import open_rows, pinned_threads
from index_builder.ivf_batch import coarse_assignment
from index_builder.knn import KnnSpec, build_index, ivf_train_rows, sample_rows, set_recall


def write_part(path: Path, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
    """Write one part directory under a temporary name, then rename it into place."""
    if path.exists():  # an earlier attempt of this task finished: same content
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arr in (("rows", rows), ("sims", sims), ("ids", ids)):
        np.save(tmp / f"{name}.npy", arr)
    try:
        os.rename(tmp, path)
    except OSError:  # another attempt renamed first
        shutil.rmtree(tmp, ignore_errors=True)


TOPK_CELLS = 2**20
"""Scores ``_topk`` selects from at once: its temporaries (negated scores, int64 order) are
``12 * TOPK_CELLS`` bytes (12 MiB) whatever the block's size."""


def _topk(s: np.ndarray, k: int, col0: int, cells: int = TOPK_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of every row of scores ``s`` (m, c), columns numbered from ``col0``, padded.

    Rows are selected ``cells // c`` at a time: ``argpartition`` of a whole block would add
    12 bytes a score to the block's own 4.
    """
    m, c = s.shape
    sims = np.full((m, k), -np.inf, dtype=np.float32)
    ids = np.full((m, k), -1, dtype=np.int64)
    kk = min(k, c)
    if kk == 0 or m == 0:
        return sims, ids
    step = max(1, cells // c)
    for r0 in range(0, m, step):
        block = s[r0 : r0 + step]
        if kk < c:
            top = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
        else:
            top = np.tile(np.arange(c), (len(block), 1))
        sims[r0 : r0 + step, :kk] = np.take_along_axis(block, top, axis=1)
        ids[r0 : r0 + step, :kk] = top + col0
    return sims, ids


def tile_pair_task(u_path: Path, a: tuple[int, int], b: tuple[int, int], k: int, part: Path) -> int:
    """Exact partial top-k of rows a (among b) and of rows b (among a), one GEMM; returns cells."""
    with pinned_threads():
        u = open_rows(u_path)
        xa, xb = np.asarray(u[a[0] : a[1]]), np.asarray(u[b[0] : b[1]])
        s = xa @ xb.T
        sa, ia = _topk(s, k, b[0])
        if a == b:
            write_part(part, np.arange(a[0], a[1], dtype=np.int64), sa, ia)
        else:
            sb, ib = _topk(np.ascontiguousarray(s.T), k, a[0])
            rows = np.r_[np.arange(a[0], a[1]), np.arange(b[0], b[1])].astype(np.int64)
            write_part(part, rows, np.vstack([sa, sb]), np.vstack([ia, ib]))
    return s.size


def exact_tasks(n: int, tile: int, parts: Path) -> tuple[list[tuple[Any, ...]], dict[int, list[Path]]]:
    """Tile-pair tasks ``(a, b, part)`` and, per row block start, the parts holding its rows."""
    starts = range(0, n, tile)
    tasks: list[tuple[Any, ...]] = []
    by_block: dict[int, list[Path]] = {lo: [] for lo in starts}
    for a0 in starts:
        for b0 in starts:
            if b0 < a0:
                continue
            part = parts / f"tile_{a0}_{b0}"
            tasks.append(((a0, min(n, a0 + tile)), (b0, min(n, b0 + tile)), part))
            by_block[a0].append(part)
            if b0 != a0:
                by_block[b0].append(part)
    return tasks, by_block


KMEANS_BLOCK_BYTES = 4096 * 1024 * 4
"""FAISS's k-means assigns the sample by blocks of 4096 rows x 1024 centroids of scores."""


def train_rows(spec: KnnSpec, d: int, worker_bytes: int) -> int:
    """Rows the training task samples: the single-process build's, at most what ``worker_bytes`` holds.

    The single-process sample is ``spec.train_size`` or ``max(50 nlist, 10000)``; a task holds
    it (``4 d``), each row's assignment (``12``), the centroids twice and k-means's score block.
    A smaller sample is another draw of :func:`~index_builder.knn.sample_rows` with the same
    seed: deterministic, not a subset of the larger one.
    """
    nlist = faiss.extract_index_ivf(faiss.index_factory(d, spec.method)).nlist
    wanted = ivf_train_rows(nlist, spec.train_size)
    room = worker_bytes - KMEANS_BLOCK_BYTES - 8 * nlist * d
    return max(nlist, min(wanted, room // (4 * d + 12)))


def train_task(u_path: Path, spec: KnnSpec, index_path: Path, rows: int) -> int:
    """Train ``spec``'s IVF index on a seeded sample of ``rows`` rows; write it (empty); returns nlist."""
    with pinned_threads():
        index = build_index(open_rows(u_path), replace(spec, train_size=rows), block_size=1, add=False)
        tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, index_path)
        return int(faiss.extract_index_ivf(index).nlist)


def assign_task(
    index_path: Path, u_path: Path, assign_path: Path, lo: int, hi: int, probes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coarse assignment of rows [lo, hi) into the assignment memmap; (members, probers) per list."""
    with pinned_threads():
        index = faiss.read_index(str(index_path))
        nlist = faiss.extract_index_ivf(index).nlist
        assign = open_rows(assign_path, "r+")
        block = coarse_assignment(index, open_rows(u_path)[lo:hi], probes, max(1, hi - lo))
        assign[lo:hi] = block
        assign.flush()
        return np.bincount(block[:, 0], minlength=nlist), np.bincount(block.ravel(), minlength=nlist)


def list_groups(
    members: np.ndarray, probers: np.ndarray, d: int, k: int, limit: int
) -> list[tuple[int, int]]:
    """Contiguous list ranges whose members' rows and probers' rows and heaps fit ``limit`` bytes."""
    cost = members * 4 * d + probers * (4 * d + 12 * k + 16)
    groups, start, total = [], 0, 0
    for lst, c in enumerate(cost.tolist()):
        if total and total + c > limit:
            groups.append((start, lst))
            start, total = lst, 0
        total += c
    groups.append((start, len(cost)))
    return groups


def list_group_task(
    u_path: Path, assign_path: Path, lists: tuple[int, int], k: int, block: int, tile: int, part: Path
) -> int:
    """Partial top-k of every row probing a list in ``lists`` among those lists' members."""
    with pinned_threads():
        u, assign = open_rows(u_path), open_rows(assign_path)
        l0, l1 = lists
        member_rows, member_lists, probe_rows, probe_lists = [], [], [], []
        for lo in range(0, len(assign), block):
            a = np.asarray(assign[lo : lo + block])
            mine = (a[:, 0] >= l0) & (a[:, 0] < l1)
            member_rows.append(lo + np.flatnonzero(mine))
            member_lists.append(a[mine, 0])
            r, c = np.nonzero((a >= l0) & (a < l1))
            probe_rows.append(lo + r)
            probe_lists.append(a[r, c])
        m_rows, m_lists = np.concatenate(member_rows), np.concatenate(member_lists)
        p_rows, p_lists = np.concatenate(probe_rows), np.concatenate(probe_lists)
        rows = np.unique(p_rows)
        heap = faiss.ResultHeap(len(rows), k, keep_max=True)
        cells = 0
        for lst in range(l0, l1):
            members = m_rows[m_lists == lst]
            probers = p_rows[p_lists == lst]
            if len(members) == 0 or len(probers) == 0:
                continue
            xb = np.asarray(u[members])
            step = max(1, tile * tile // max(len(members), 1))
            for q0 in range(0, len(probers), step):
                q = probers[q0 : q0 + step]
                s = np.asarray(u[q]) @ xb.T
                sims, top = _topk(s, k, 0)
                ids = np.where(top >= 0, members[np.maximum(top, 0)], -1)
                heap.add_result_subset(np.searchsorted(rows, q), sims, ids)
                cells += s.size
        heap.finalize()
        write_part(part, rows.astype(np.int64), heap.D, heap.I)
        return cells


def merge_task(
    parts: list[Path], u_path: Path, sims_path: Path, ids_path: Path, r0: int, r1: int, k: int, block: int
) -> int:
    """Fold every part's rows [r0, r1) into the graph memmaps; returns rows searched exactly."""
    with pinned_threads():
        heap = faiss.ResultHeap(r1 - r0, k, keep_max=True)
        for part in parts:
            rows, sims, ids = (
                np.load(part / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in ("rows", "sims", "ids")
            )
            lo, hi = np.searchsorted(rows, [r0, r1])
            if hi > lo:
                heap.add_result_subset(
                    np.asarray(rows[lo:hi]) - r0,
                    np.ascontiguousarray(sims[lo:hi]),
                    np.ascontiguousarray(ids[lo:hi]),
                )
        heap.finalize()
        sims, ids = heap.D, heap.I
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):
            u = open_rows(u_path)
            sims[short], ids[short] = exact_knn(np.asarray(u[r0 + short]), u, k)  # u mapped, not read in
        out_sims, out_ids = open_rows(sims_path, "r+"), open_rows(ids_path, "r+")
        out_sims[r0:r1], out_ids[r0:r1] = sims, ids
        out_sims.flush()
        out_ids.flush()
        return len(short)


def recall_task(u_path: Path, ids_path: Path, n: int, k: int, spec: KnnSpec, block: int) -> tuple[float, int]:
    """The graph's recall against exact kNN on the seeded sample of rows (as ``self_knn``)."""
    with pinned_threads():
        u, graph = open_rows(u_path), open_rows(ids_path)
        rows = sample_rows(n, spec.recall_sample, spec.seed)
        truth = exact_knn(np.asarray(u[rows]), u, k)[1]  # as self_knn: the same ties
        return set_recall(np.asarray(graph[rows]), truth), len(rows)
