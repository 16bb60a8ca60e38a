"""AQE over a whole matrix, memory-bounded: normalise, kNN, expand, round after round.

This is the reference's ``aqe`` (``docs/AQE.md``) without its N x N similarity matrix. Peak
memory of a resident run (no ``plan``, or one that fits), for N rows of dimension d and
``k = qe_k``::

    2 * N * d * 4 bytes       normalised rows of the previous level + the expanded rows
  + N * k * 12 bytes          neighbour ids (int64) and similarities (float32)
  + block * k * 8             one kNN block's results
  + 1024 * k * d * 8          gathered neighbour rows of one expansion chunk (EXPAND_CHUNK)
  + the approximate kNN index, if any (e.g. ~N * d * 4 for IVF,Flat)

The expanded rows can live in a memory-mapped file (``out=``) instead of RAM. Out of core (a
:class:`~index_builder.budget.Plan` that does not fit, with an
:class:`~index_builder.storage.ArrayStore` over a directory) every array of N rows is a memory-mapped
file, the kNN heaps cover a stripe of rows, IVF lists are on disk, and the anonymous memory is
the plan's (``index_builder.budget``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from aqe_retrieval import aqe
from index_builder import budget
from index_builder.budget import Plan
from index_builder.graph_auto import graph_knn
from index_builder.inputs import EmbeddingSource, as_source, bad_rows, raise_for_bad_rows
from index_builder.knn import KnnMemory, KnnResult, KnnSpec
from index_builder.ondisk import OnDiskLists
from index_builder.pool import Progress
from index_builder.progress import progress
from index_builder.storage import ArrayStore

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16384
EXPAND_CHUNK = budget.EXPAND_CHUNK
"""Rows expanded at a time: their gathered neighbours take ``EXPAND_CHUNK * k * d * 8`` bytes."""


@dataclass(frozen=True)
class AqeParams:
    """The expansion's parameters, validated: ``qe_k >= 1``, ``qe_times >= 1``, finite ``alpha``."""

    qe_k: int = 10
    alpha: float = 3.0
    qe_times: int = 1

    def __post_init__(self) -> None:
        if int(self.qe_k) != self.qe_k or self.qe_k < 1:
            raise ValueError(f"qe_k must be an integer >= 1, got {self.qe_k}")
        if int(self.qe_times) != self.qe_times or self.qe_times < 1:
            raise ValueError(f"qe_times must be an integer >= 1, got {self.qe_times}")
        if not np.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")


@dataclass
class RoundReport:
    """What one round measured: kNN and expansion seconds, graph recall if approximate."""

    round: int
    knn_seconds: float
    expand_seconds: float
    graph_recall: float | None
    recall_sample: int


@dataclass
class ExpansionReport:
    """Summary of a whole expansion: effective ``qe_k``, per-round figures."""

    n: int
    d: int
    effective_qe_k: int
    read_seconds: float = 0.0
    rounds: list[RoundReport] = field(default_factory=list)

    @property
    def graph_recall(self) -> float | None:
        """The lowest per-round graph recall (``None`` in exact mode)."""
        values = [r.graph_recall for r in self.rounds if r.graph_recall is not None]
        return min(values) if values else None


def load_normalized(
    source: EmbeddingSource,
    block_size: int,
    label: str,
    show_progress: bool | None = None,
    store: ArrayStore | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read, validate and L2-normalise all rows: ``(u (n, d) float32, norms (n,) float32)``.

    Raises :class:`~aqe_retrieval.errors.InputError` naming the first NaN/Inf and all-zero rows.
    ``store``: where ``u`` and ``norms`` are allocated (``level_0``, ``level_0_norms``).
    """
    n, d = source.n, source.d
    store = store or ArrayStore()
    u = store.empty("level_0", (n, d), np.float32)
    norms = store.empty("level_0_norms", (n,), np.float32)
    with progress("read+normalise", n, enabled=show_progress) as update:
        for start, block in source.blocks(block_size):
            # Stop at the first block with bad rows: naming them beats reading the rest.
            raise_for_bad_rows(label, *bad_rows(block, start))
            u[start : start + len(block)], norms[start : start + len(block)] = aqe.normalize_rows(block)
            update(len(block))
    return u, norms


@dataclass(frozen=True)
class Level:
    """One level of the expansion, before its rows are released.

    ``rows`` (n, d) float32 are the level's L2-normalised rows, ``norms`` (n,) float32 their
    norms, ``knn`` the neighbour graph the next level is expanded over. The next round reuses
    ``rows`` in place: copy what must outlive the step.
    """

    number: int
    rows: np.ndarray
    norms: np.ndarray
    knn: KnnResult


class Expansion:
    """Every row of ``source`` expanded ``qe_times`` times, level by level.

    Iterate it for levels ``0 .. qe_times - 1`` (:class:`Level`); afterwards ``expanded`` holds
    the result (n, d) float32 and ``report`` what each round measured. ``out``, if given, is a
    writable (n, d) float32 array (e.g. a memmap) that receives the result. ``plan`` and
    ``store`` bound memory (module docstring): arrays are allocated in ``store`` as ``level_<t>``,
    ``level_<t>_norms``, ``graph_<t>_ids``/``_sims`` and ``expanded``, an IVF graph's lists at its
    file ``level_<t>.ivfdata``. Arguments are checked on construction; the work happens during
    the iteration, which runs once.
    """

    def __init__(
        self,
        source: EmbeddingSource,
        params: AqeParams,
        knn: KnnSpec | None = None,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        out: np.ndarray | None = None,
        show_progress: bool | None = None,
        label: str = "input",
        plan: Plan | None = None,
        store: ArrayStore | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        n, d = source.n, source.d
        k = aqe.effective_qe_k(params.qe_k, n)
        if k < params.qe_k:
            logger.warning("only %d rows: qe_k clamped from %d to %d", n, params.qe_k, k)
        if out is not None and (out.shape != (n, d) or out.dtype != np.float32):
            raise ValueError(f"out must be float32 of shape {(n, d)}, got {out.dtype} {out.shape}")
        self.source, self.params, self.knn = source, params, knn or KnnSpec()
        self.block_size, self.out, self.show_progress, self.label = block_size, out, show_progress, label
        self.plan, self.store = plan, store or ArrayStore()
        if plan is not None and not plan.resident:
            self.block_size = min(block_size, plan.block_size)
        self.report = ExpansionReport(n=n, d=d, effective_qe_k=k)
        self._started = False
        self._expanded: np.ndarray | None = None

    @property
    def expanded(self) -> np.ndarray:
        """The expanded rows (n, d) float32, once every level has been iterated."""
        if self._expanded is None:
            raise RuntimeError("the expansion has not been run to its end")
        return self._expanded

    def __iter__(self) -> Iterator[Level]:
        """Run the rounds, yielding each level's rows and kNN before the round expands them."""
        if self._started:
            raise RuntimeError("an Expansion runs once")
        self._started = True
        params, block_size, show_progress = self.params, self.block_size, self.show_progress
        n, d, k = self.report.n, self.report.d, self.report.effective_qe_k
        t0 = time.perf_counter()
        store = self.store
        u, norms = load_normalized(self.source, block_size, self.label, show_progress, store)
        self.report.read_seconds = time.perf_counter() - t0
        x = u
        for t in range(1, params.qe_times + 1):
            with progress(f"round {t}/{params.qe_times} kNN", n, enabled=show_progress) as update:
                memory = self._knn_memory(t - 1)
                result = graph_knn(u, k, self.knn, block_size, update, memory=memory)
            if result.recall is not None:
                logger.info(
                    "round %d: graph recall@%d %.4f on %d rows", t, k, result.recall, result.recall_sample
                )
            yield Level(t - 1, u, norms, result)
            t1 = time.perf_counter()
            last = t == params.qe_times
            if last and self.out is not None:
                x = self.out
            else:
                x = store.empty("expanded" if last else f"level_{t}", (n, d), np.float32)
            with progress(f"round {t}/{params.qe_times} expand", n, enabled=show_progress) as update:
                if self.plan is not None and not self.plan.resident:
                    plan = self.plan
                    expand_streamed(
                        u, norms, result.ids, params.alpha, x, plan.expand_stripe, plan.chunk, update
                    )
                else:
                    step = min(block_size, EXPAND_CHUNK)
                    for lo in range(0, n, step):
                        hi = min(n, lo + step)
                        x[lo:hi] = expand_block(u, norms, u[lo:hi], result.ids[lo:hi], params.alpha)
                        update(hi - lo)
            self.report.rounds.append(
                RoundReport(t, result.seconds, time.perf_counter() - t1, result.recall, result.recall_sample)
            )
            del result
            store.discard(f"graph_{t - 1}_ids")
            store.discard(f"graph_{t - 1}_sims")
            if not last:
                # x becomes the next level's normalised rows in place: raw = norm * u.
                del u, norms
                store.discard(f"level_{t - 1}")
                store.discard(f"level_{t - 1}_norms")
                norms = aqe.normalize_rows_inplace(
                    x, block_size, out=store.empty(f"level_{t}_norms", (n,), np.float32)
                )
                u = x
        self._expanded = x

    def _knn_memory(self, level: int) -> KnnMemory:
        """The kNN phase's share of the plan for level ``level`` (all in RAM when resident)."""
        plan, store = self.plan, self.store
        if plan is None or plan.resident:
            return KnnMemory(store=store, graph=f"graph_{level}")
        ivfdata, scratch = store.file(f"level_{level}.ivfdata"), store.directory
        lists = OnDiskLists(ivfdata, scratch, plan.shard_rows) if ivfdata and scratch else None
        return KnnMemory(plan.tile, plan.stripe, lists, store, f"graph_{level}")


def expand_source(
    source: EmbeddingSource,
    params: AqeParams,
    knn: KnnSpec | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    out: np.ndarray | None = None,
    show_progress: bool | None = None,
    label: str = "input",
    plan: Plan | None = None,
    store: ArrayStore | None = None,
) -> tuple[np.ndarray, ExpansionReport]:
    """Expand every row of ``source`` ``qe_times`` times; returns ``(X (n, d) float32, report)``.

    ``out``, if given, is a writable (n, d) float32 array (e.g. a memmap) that receives the result.
    To see each level's rows and kNN on the way, iterate an :class:`Expansion` instead.
    """
    expansion = Expansion(
        source,
        params,
        knn,
        block_size=block_size,
        out=out,
        show_progress=show_progress,
        label=label,
        plan=plan,
        store=store,
    )
    for _ in expansion:
        pass
    return expansion.expanded, expansion.report


def expand_block(
    u: np.ndarray, norms: np.ndarray, u_block: np.ndarray, ids: np.ndarray, alpha: float
) -> np.ndarray:
    """Expanded rows for one block: ``ids`` (b, k) neighbour rows of ``u_block`` (b, d) -> (b, d).

    Weights use cosines recomputed from the normalised rows, so an approximate index's distance
    estimates (PQ codes, ...) never leak into the result.
    """
    nb_u = u[ids]  # (b, k, d)
    sims = np.einsum("bkd,bd->bk", nb_u, u_block)
    nb_raw = nb_u * norms[ids][:, :, None]
    return aqe.expand_rows(nb_raw, sims, alpha)


def expand_streamed(
    u: np.ndarray,
    norms: np.ndarray,
    ids: np.ndarray,
    alpha: float,
    out: np.ndarray,
    stripe: int,
    chunk: int,
    progress: Progress | None = None,
) -> None:
    """:func:`expand_block` of every row into ``out`` (n, d), reading ``u`` in ascending order.

    Gathering each row's neighbours from a memory-mapped ``u`` larger than the page cache is a
    random read per neighbour (measured: 170 rows/s under a 60 MiB cgroup). Instead, for each
    stripe of ``stripe`` output rows, its ``(row, neighbour)`` pairs are sorted by neighbour and
    taken ``chunk * k`` at a time, so ``u`` is read front to back once per stripe, and each
    pair's weighted raw row is summed into its row. The same sum as :func:`expand_block` in
    another order (float rounding apart). Memory: ``stripe * (8 d + 24 k)`` bytes for the
    stripe plus ``chunk * k * d * 12`` for one chunk of pairs.
    """
    n, d = u.shape
    k = ids.shape[1]
    for o0 in range(0, n, stripe):
        o1 = min(n, o0 + stripe)
        m = o1 - o0
        own = np.array(u[o0:o1])
        nbrs = np.asarray(ids[o0:o1], dtype=np.int64).ravel()
        order = np.argsort(nbrs, kind="stable")
        nbrs, owners = nbrs[order], order // k
        del order
        acc = np.zeros((m, d), dtype=np.float32)
        for p0 in range(0, len(nbrs), chunk * k):
            j, i = nbrs[p0 : p0 + chunk * k], owners[p0 : p0 + chunk * k]
            rows = np.asarray(u[j], dtype=np.float32)  # ascending j: the mapped file is read in order
            w = aqe.aqe_weights(np.einsum("pd,pd->p", rows, own[i]), alpha) * np.asarray(norms[j])
            rows *= w[:, None]
            by_owner = np.argsort(i, kind="stable")
            i = i[by_owner]
            starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
            acc[i[starts]] += np.add.reduceat(rows[by_owner], starts, axis=0)
        acc /= np.float32(k)
        out[o0:o1] = acc
        if progress:
            progress(m)


def aqe_expand(
    query_feat: np.ndarray | None,
    gallery_feat: np.ndarray | str,
    qe_times: int = 1,
    qe_k: int = 10,
    alpha: float = 3.0,
    *,
    knn: KnnSpec | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    show_progress: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Memory-bounded drop-in for fast-reid's ``aqe``: returns ``(query_feat, gallery_feat)``.

    With queries, the graph spans queries and gallery together (transductive mode, the reference's
    exact semantics); with ``query_feat=None`` (or 0 rows) the gallery is expanded over itself
    (serving mode). Inputs are (n, d) float32/float16 arrays or ``.npy`` paths; outputs float32.
    """
    params = AqeParams(qe_k=qe_k, alpha=alpha, qe_times=qe_times)
    gallery = as_source(gallery_feat)
    num_query = 0 if query_feat is None else len(query_feat)
    source = as_source(query_feat).concat(gallery) if query_feat is not None and num_query else gallery
    x, _ = expand_source(source, params, knn, block_size=block_size, show_progress=show_progress)
    return x[:num_query], x[num_query:]
