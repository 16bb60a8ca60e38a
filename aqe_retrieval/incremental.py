"""Add and delete gallery rows in seconds: the levels and graphs updated exactly, a delta published.

Serving mode (``docs/AQE.md``): level 0 is the raw gallery, level t + 1 each row's AQE over its
top-``qe_k`` neighbours of level t. A change touches only some rows, level by level:

* level 0 changes exactly at the added rows (C_0);
* a kept row must recompute its level-t neighbours (exact kNN against all rows; with an
  approximate graph, at level 0, the graph's own index: :func:`graph_search`) iff one of
  them was deleted or changed value (it may have moved out); a row none of whose neighbours
  changed keeps its list, except that a changed or added row may now beat its ``qe_k``-th
  similarity: one GEMM of the changed rows against all rows, in blocks, finds those entries.
  Both directions are therefore exact: a changed row leaves a list (the list is recomputed) or
  enters one (the merge);
* row i's level-(t + 1) value changes iff its neighbour set changed, or it or one of its
  neighbours changed at level t (C_{t+1}); only those rows are re-expanded.

With an exact stored graph the result equals a full build over the resulting rows (up to ties
at the ``qe_k`` boundary, float tolerance in the values). With an approximate graph the changed
rows get their neighbours from the graph's index at level 0 (exact ones at deeper levels,
whose stored indexes hold the old values) and the rest keep theirs; the manifest keeps saying
the graph is approximate. Cost per level: ``|R_t| x N`` + ``N x |C_t|`` dot products.

Any version ``build`` makes is accepted: approximate serving or expansion indexes (IVF, HNSW,
SQ8/PQ codes, on-disk lists) are never rebuilt nor read back; the delta version serves them
masked beside its delta rows (:mod:`aqe_retrieval.overlay`). Float16 levels are read as float32
(their stored values) and the new rows stored back as float16 by the artifact.

The same code serves ``index-builder add``/``delete`` and the service's optional admin routes,
so it lives in the core (the service never imports the builder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aqe_retrieval import aqe, artifact, delta
from aqe_retrieval.errors import ArtifactError, InputError, UnknownIdError
from aqe_retrieval.faiss_search import bitmap_selector, exact_knn, parameters_with_selector
from aqe_retrieval.manifest import DELTA_FORMAT_VERSION, Manifest
from aqe_retrieval.overlay import DeltaIndex, merge

logger = logging.getLogger(__name__)

CHUNK = 1024
"""Rows expanded (and rows of the entry GEMM) at a time."""


@dataclass
class Change:
    """One add or delete: raw rows (m, d) with their ids/metadata, or ids to delete."""

    operation: str  # a fingerprint of the inputs: a retry of the same operation is a no-op
    rows: np.ndarray | None = None
    ids: list[str] | None = None
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What :func:`apply_change` did: the current manifest, whether it published, figures."""

    manifest: Manifest
    applied: bool
    changed_rows: list[int] = field(default_factory=list)  # per level 0 .. qe_times
    seconds: float = 0.0


def apply_change(root: Path, change: Change, keep: int = 3) -> Outcome:
    """Apply ``change`` to the current version of ``root`` and publish the result (under its lock)."""
    t0 = time.perf_counter()
    with artifact.build_lock(root):
        current = artifact.current_version(root)
        if current is None:
            raise ArtifactError(f"{root}: nothing published yet; run a full build first")
        parent = artifact.read_manifest(root, current)
        if change.operation in parent.history:
            logger.info("operation %s is already in version %s: nothing to do", change.operation, current)
            return Outcome(parent, False)
        art = artifact.load(root, current, check=False)
        keep_mask, added, added_ids, added_meta = _resolve(art, change)
        graphs = artifact.load_graphs(art)
        # float16 levels are computed on in float32 (their stored values), deltas stored as float16
        old_levels = [(np.asarray(lv.rows, np.float32), np.asarray(lv.norms)) for lv in art.levels]
        if graphs is None:  # a version built before graphs were stored: recompute them exactly
            graphs = [exact_knn(u, u, parent.effective_qe_k)[::-1] for u, _ in old_levels]
        result = propagate(
            old_levels,
            artifact.delta_served_rows(art),
            graphs,
            keep_mask,
            added,
            parent.effective_qe_k,
            parent.alpha,
            graph_search(parent, art, keep_mask),
        )
        old_pos = artifact.delta_positions(art)
        # the change log (the next full build folds it in) is durable before the version exists
        artifact.record_change(
            root,
            change.operation,
            rows=added,
            ids=added_ids,
            metadata=added_meta,
            delete=change.delete,
        )
        manifest = _publish(
            root, parent, art, keep_mask, result, old_pos, added_ids, added_meta, change, keep
        )
    seconds = time.perf_counter() - t0
    sizes = [len(c) for c in result.changed]
    logger.info(
        "published %s: %d rows, changed per level %s, %.2fs", manifest.version, manifest.n, sizes, seconds
    )
    return Outcome(manifest, True, sizes, seconds)


def _resolve(
    art: artifact.Artifact, change: Change
) -> tuple[np.ndarray, np.ndarray, list[str] | None, dict[str, np.ndarray]]:
    m = art.manifest
    keep_mask = np.ones(m.n, dtype=bool)
    ids = None if art.ids is None else np.asarray(art.ids)
    if change.delete:
        if ids is None:
            raise InputError(f"version {m.version} has no ids: nothing to delete by id")
        wanted = np.array(change.delete, dtype=np.str_)
        if len(np.unique(wanted)) != len(wanted):
            raise InputError("the ids to delete repeat an id")
        hit = np.isin(ids, wanted)
        unknown = sorted(set(change.delete) - set(ids[hit].tolist()))
        if unknown:
            raise UnknownIdError(f"{len(unknown)} unknown id(s), e.g. {unknown[:5]}: nothing deleted")
        keep_mask = ~hit
    rows = np.empty((0, m.d), np.float32) if change.rows is None else np.asarray(change.rows, np.float32)
    if rows.ndim != 2 or rows.shape[1] != m.d:
        raise InputError(f"added rows have shape {rows.shape}, the index has dimension {m.d}")
    bad = np.flatnonzero(~np.isfinite(rows).all(1) | ~rows.any(1))
    if len(bad):
        raise InputError(f"added rows {bad[:10].tolist()} are NaN, Inf or all zeros")
    added_ids = change.ids
    if len(rows) and ids is not None:
        if added_ids is None or len(added_ids) != len(rows):
            raise InputError(f"version {m.version} has ids: give one id per added row")
        if len(set(added_ids)) != len(added_ids):
            raise InputError("the added ids repeat an id")
        dup = np.flatnonzero(np.isin(np.array(added_ids, dtype=np.str_), ids))
        if len(dup):
            raise InputError(f"ids already in version {m.version}, e.g. {[added_ids[i] for i in dup[:5]]}")
    elif len(rows) and added_ids is not None:
        raise InputError(f"version {m.version} has no ids (row numbers): the added rows cannot bring ids")
    names = list(art.metadata)
    if len(rows) and sorted(change.metadata) != sorted(names):
        raise InputError(f"added metadata columns {sorted(change.metadata)}, the version has {sorted(names)}")
    meta = (
        {c: _column(c, change.metadata[c], np.asarray(art.metadata[c]).dtype, len(rows)) for c in names}
        if len(rows)
        else {c: art.metadata[c][:0] for c in names}
    )
    n_new = int(keep_mask.sum()) + len(rows)
    if m.effective_qe_k != m.qe_k or n_new <= m.qe_k:
        raise InputError(f"{n_new} rows for qe_k {m.qe_k}: a gallery this small needs a full build")
    return keep_mask, rows, added_ids, meta


def _column(name: str, values: object, dtype: np.dtype, m: int) -> np.ndarray:
    """An added metadata column in the version's column type (JSON gives lists of any type)."""
    try:
        col = np.asarray(values, dtype=str) if dtype.kind == "U" else np.asarray(values).astype(dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"metadata column {name!r}: not {dtype.kind} values ({exc})") from None
    if col.shape != (m,):
        raise InputError(f"metadata column {name!r} has shape {col.shape}, expected ({m},)")
    return col


@dataclass
class Propagation:
    """The new levels (normalised rows, norms), served rows, graphs, and what changed where."""

    levels: list[tuple[np.ndarray, np.ndarray]]
    final: np.ndarray  # (n, d): valid at the positions it stores (the parent's delta, changed rows)
    graphs: list[tuple[np.ndarray, np.ndarray]]
    changed: list[np.ndarray]  # per level 0 .. T: positions whose values changed (new numbering)
    graph_changed: list[np.ndarray]  # per level 0 .. T-1


def propagate(
    old_levels: list[tuple[np.ndarray, np.ndarray]],
    old_final: tuple[np.ndarray, np.ndarray],
    old_graphs: list[tuple[np.ndarray, np.ndarray]],
    keep: np.ndarray,
    added: np.ndarray,
    k: int,
    alpha: float,
    kept_search: KeptSearch | None = None,
) -> Propagation:
    """Levels and graphs of ``old[keep]`` followed by ``added``, recomputing only what changed.

    ``old_levels`` per level (u (n, d) float32 normalised, norms (n,)), ``old_final`` the
    served normalised rows the parent stores (positions, rows): the served level is written
    only at those and at the re-expanded rows, so no other served row is needed (the base's
    serving index may be lossy: SQ8, PQ); ``old_graphs`` per level (ids (n, k) int64, sims (n, k)),
    ``keep`` (n,) bool, ``added`` (m, d) raw; ``kept_search``: level 0's top-k among the kept
    rows through the graph's own index (:func:`graph_search`; None: exact). Peak memory: two
    copies of the levels plus ``CHUNK x |C_t|`` floats of one entry block and ``CHUNK x k x d``
    of one expansion chunk.
    """
    n_kept, m = int(keep.sum()), len(added)
    n = n_kept + m
    renumber = np.full(len(keep), -1, dtype=np.int64)
    renumber[keep] = np.arange(n_kept)
    u_add, norms_add = aqe.normalize_rows(added)
    u = np.concatenate([old_levels[0][0][keep], u_add])
    norms = np.concatenate([old_levels[0][1][keep], norms_add])
    changed = np.arange(n_kept, n)
    out = Propagation([], np.empty(0), [], [changed], [])
    for t, (old_ids, old_sims) in enumerate(old_graphs):
        out.levels.append((u, norms))
        ids, sims, gchanged = update_graph(
            u, renumber, np.asarray(old_ids)[keep], np.asarray(old_sims)[keep], changed, k,
            kept_search if t == 0 else None,
        )  # fmt: skip
        out.graphs.append((ids, sims))
        out.graph_changed.append(np.flatnonzero(gchanged))
        is_changed = np.zeros(n, dtype=bool)
        is_changed[changed] = True
        nxt = np.flatnonzero(gchanged | is_changed | is_changed[ids].any(axis=1))
        x = np.empty((len(nxt), u.shape[1]), np.float32)
        for lo in range(0, len(nxt), CHUNK):
            r = nxt[lo : lo + CHUNK]
            nb_u = u[ids[r]]
            cos = np.einsum("bkd,bd->bk", nb_u, u[r])
            x[lo : lo + CHUNK] = aqe.expand_rows(nb_u * norms[ids[r]][:, :, None], cos, alpha)
        new_u, new_norms = aqe.normalize_rows(x)
        if t + 1 < len(old_graphs):
            u = np.concatenate([old_levels[t + 1][0][keep], np.empty((m, u.shape[1]), np.float32)])
            norms = np.concatenate([old_levels[t + 1][1][keep], np.empty(m, np.float32)])
            u[nxt], norms[nxt] = new_u, new_norms
        else:
            # zeros (calloc: untouched pages cost nothing) except where a value is known
            out.final = np.zeros((n, u.shape[1]), np.float32)
            moved = renumber[old_final[0]]
            out.final[moved[moved >= 0]] = old_final[1][moved >= 0]
            out.final[nxt] = new_u
        changed = nxt
        out.changed.append(changed)
    return out


def update_graph(
    u: np.ndarray,
    renumber: np.ndarray,
    ids_kept: np.ndarray,
    sims_kept: np.ndarray,
    changed: np.ndarray,
    k: int,
    kept_search: KeptSearch | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level's top-k graph over the new rows ``u`` (n, d), exact if the old one was.

    ``ids_kept``/``sims_kept`` (n_kept, k): the kept rows' old lists (old numbering),
    ``changed``: new positions whose rows changed value or are new. Returns (ids, sims, mask of
    rows whose list changed). A recomputed list is exact, or with ``kept_search`` (an
    approximate graph; only where the kept rows' values did not change: level 0) the graph's own
    index over the kept rows merged with an exact search of the rows after them (the added).
    """
    n, n_kept = len(u), len(ids_kept)
    is_changed = np.zeros(n, dtype=bool)
    is_changed[changed] = True
    ids = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    ids[:n_kept] = renumber[ids_kept]
    sims[:n_kept] = sims_kept
    # a list that held a deleted or changed row is recomputed: that row may have moved out
    stale = (ids[:n_kept] < 0).any(axis=1) | is_changed[np.maximum(ids[:n_kept], 0)].any(axis=1)
    stale |= is_changed[:n_kept]
    redo = np.concatenate([np.flatnonzero(stale), np.arange(n_kept, n)])
    gchanged = np.zeros(n, dtype=bool)
    for lo in range(0, len(redo), 8 * CHUNK):
        r = redo[lo : lo + 8 * CHUNK]
        if kept_search is None:
            sims[r], ids[r] = exact_knn(u[r], u, k)
            continue
        ks, ki = kept_search(u[r], k)
        ki = np.where(ki >= 0, renumber[np.maximum(ki, 0)], -1)
        parts_s, parts_i = [np.where(ki < 0, -np.inf, ks)], [ki]
        if n > n_kept:
            ns, ni = exact_knn(u[r], u[n_kept:], min(k, n - n_kept))
            parts_s.append(ns)
            parts_i.append(ni + n_kept)
        sims[r], ids[r] = merge(parts_s, parts_i, len(r), k)
        short = np.flatnonzero((ids[r] < 0).any(axis=1))  # the index came back short: exactly
        if short.size:
            sims[r[short]], ids[r[short]] = exact_knn(u[r[short]], u, k)
    gchanged[redo] = True
    if len(changed) == 0:
        return ids, sims, gchanged
    # the other lists stay, unless a changed row now beats their k-th similarity: one GEMM
    # block, then only the entries that beat it (at most k a row, by a linear partition) are
    # merged with the row's list (sorting all |C| columns of every entering row was 45 % of an
    # add of 1 % at 1M rows, which took 0.48 of a full build's time)
    others = np.flatnonzero(~gchanged)
    cu = np.ascontiguousarray(u[changed])
    for lo in range(0, len(others), CHUNK):
        r = others[lo : lo + CHUNK]
        s = u[r] @ cu.T
        beats = s > sims[r].min(axis=1)[:, None]
        enter = beats.any(axis=1)
        if not enter.any():
            continue
        r, s = r[enter], np.where(beats[enter], s[enter], -np.inf)
        e = min(k, int(beats[enter].sum(axis=1).max()))
        near = np.argpartition(-s, e - 1, axis=1)[:, :e] if e < s.shape[1] else np.argsort(-s, axis=1)
        sims[r], ids[r] = merge(
            [sims[r], np.take_along_axis(s, near, axis=1)], [ids[r], changed[near]], len(r), k
        )
        gchanged[r] = True
    return ids, sims, gchanged


KeptSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``(u (q, d) normalised, k) -> (sims, ids) (q, k)``: top-k among the kept rows, numbered as in
the parent version (``-1`` where fewer were found)."""


def graph_search(parent: Manifest, art: artifact.Artifact, keep: np.ndarray) -> KeptSearch | None:
    """Level 0's search of an approximate graph's own index, deleted rows masked; else None.

    A build with an approximate graph serves level 0's expansion from the graph's own index
    (its nprobe or efSearch), and its kNN came from that index: rows whose lists are recomputed
    get their neighbours the same way, at a cost of one index search each instead of a scan of
    every row (measured at 1,000,000 x 64, IVF4096 nprobe 64, with the entry merge's fix: add of
    1 % 271 -> 34 s, delete of 0.5 % 190 -> 17 s). An exact graph, or a level 0 without an
    index, gets None: the lists are recomputed exactly.
    """
    level = art.levels[0] if art.levels else None
    if str(parent.knn.get("method", "exact")).lower() == "exact" or level is None or level.index is None:
        return None
    index, entry = level.index, level.entry
    if isinstance(index, DeltaIndex):
        return lambda u, k: index.search(u, k, mask=keep)
    params = parameters_with_selector(index, bitmap_selector(keep), entry.nprobe, entry.ef_search)
    return lambda u, k: index.search(np.ascontiguousarray(u, dtype=np.float32), k, params=params)


def _publish(
    root: Path,
    parent: Manifest,
    art: artifact.Artifact,
    keep: np.ndarray,
    result: Propagation,
    old_pos: tuple[list[np.ndarray], list[np.ndarray]],
    added_ids: list[str] | None,
    added_meta: dict[str, np.ndarray],
    change: Change,
    keep_versions: int,
) -> Manifest:
    """Stage base links plus the cumulative delta over the base, and publish it."""
    nb = parent.delta.base_n if parent.delta else parent.n
    base_version = parent.delta.base_version if parent.delta else parent.version
    old_view = delta.View(nb, artifact.delta_dead(art), parent.delta.appended if parent.delta else 0)
    alive_old = len(old_view.alive)
    deleted_base = old_view.alive[~keep[:alive_old]]
    dead = np.union1d(artifact.delta_dead(art), deleted_base)
    n_kept = int(keep.sum())
    renumber = np.full(len(keep), -1, dtype=np.int64)
    renumber[keep] = np.arange(n_kept)
    appended_old = np.arange(alive_old, len(keep))[keep[alive_old:]]
    appended = np.concatenate([renumber[appended_old], np.arange(n_kept, len(result.final))])

    def positions(old: np.ndarray, now: np.ndarray) -> np.ndarray:
        moved = renumber[old]
        return np.union1d(np.union1d(moved[moved >= 0], now), appended)

    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    for t, (u, norms) in enumerate(result.levels):
        pos = positions(old_pos[0][t], result.changed[t])
        levels.append((pos, u[pos], norms[pos]))
    pos = positions(old_pos[0][-1], result.changed[-1])
    levels.append((pos, result.final[pos], None))
    graphs = []
    for t, (ids, sims) in enumerate(result.graphs):
        pos = positions(old_pos[1][t], result.graph_changed[t])
        graphs.append((pos, ids[pos], sims[pos]))
    ids_kept_appended = None
    if art.ids is not None:
        old_appended_ids = np.asarray(art.ids)[alive_old:][keep[alive_old:]]
        ids_kept_appended = [*old_appended_ids.tolist(), *(added_ids or [])]
    meta = {
        name: np.concatenate([np.asarray(col)[alive_old:][keep[alive_old:]], added_meta[name]])
        for name, col in art.metadata.items()
    }
    fields = parent.model_dump(
        include={
            "d",
            "qe_k",
            "effective_qe_k",
            "alpha",
            "qe_times",
            "knn",
            "graph_recall",
            "graph_recall_sample",
        }
    )
    with artifact.staging(root) as stage:
        stage.link_base(root, parent)
        entry = stage.save_delta(
            base_version, nb, dead, ids_kept_appended, meta, levels, graphs, len(appended)
        )
        return stage.publish(
            keep=keep_versions,
            format_version=DELTA_FORMAT_VERSION,
            n=len(result.final),
            delta=entry,
            history=[*parent.history, change.operation],
            input={**parent.input, "changes": len(parent.history) + 1},
            **fields,
        )
