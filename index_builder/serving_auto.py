"""``--serving-index auto``: the fastest index whose held-out recall@k meets the target, within budget.

Candidates, each built once (the winner is the index measured, never rebuilt; an HNSW winner gets the
held-out rows added to its links and its storage refilled in row order), in this order:

* ``exact`` (flat, ``4 n d`` bytes): recall 1 by construction, the fallback that always meets it;
  only timed;
* ``HNSW32`` and ``HNSW32_SQ8``: one graph shared by both storages; efSearch climbs
  :data:`EF_LADDER`. The links are built over ``graph_rows`` (the build passes level 0, the
  normalised gallery rows) and reused by every later selection of the build (:class:`Shared`):
  row i is the same item in every level. Held-out queries are measured on the links of every
  other row, before the held-out rows are added (:func:`hnsw_family`): a held-out row that is a
  node of the graph is linked to its own nearest neighbours, and its query walks through it to
  its answers, which no real query can (measured at 200,000 x 256, HNSW32_SQ8: recall@10 0.987
  at efSearch 16 against 0.969 for separate queries). Measured against the 1,000 separate queries
  of ``benchmarks/bench_vs_chroma.py``, hiding each held-out row's node instead (the measure
  before this one) was off in both directions: level-0 recall@9 0.953 against 0.975 at efSearch
  16 on the Bible set (HNSW's pruning leaves few links among the six translations of a verse, and
  a hidden node cuts its siblings off), 0.971 against 0.968 at 56 on the synthetic set.
  Measured at 200,000 x 256 (synthetic), a graph over
  level 0 searched with the expanded rows reached recall@10 0.989 at efSearch 16, one built over
  the expanded rows 0.918 (0.975 at 192): expansion makes near-duplicates, and HNSW's pruning
  keeps few links among them (both measured before held-out nodes were hidden, so optimistic);
* ``IVF<nlist>,Flat``, ``IVF<nlist>,SQ8`` (and ``IVF<nlist>,PQ<d/4>`` only when neither fits
  the budget: PQ trades recall for memory alone): one coarse quantizer (k-means on
  :data:`KMEANS_ROWS_PER_LIST` rows a list, :data:`KMEANS_NITER` iterations) and one coarse
  assignment shared by all; nlist near ``2 sqrt(n)`` (:func:`ivf_nlist`); nprobe climbs
  :data:`NPROBE_LADDER`.

Each configuration is measured on :class:`~index_builder.heldout.QuerySample` queries (held-out,
online-expanded: the way queries arrive) against exact search over the same rows: recall@k from
one batched search, cost as the median of single-query searches on one FAISS thread (what a
service search thread runs with, ``AQE_THREADS=1``). A ladder stops at the first configuration
that meets the target or once it is slower than the best one that did. The cheapest configuration
meeting the target wins; if none does, the most accurate, with a warning. Every configuration
tried goes into the manifest (:class:`~aqe_retrieval.manifest.IndexCandidate`), every one not
built with its reason (:class:`~aqe_retrieval.manifest.SkippedCandidate`), and the seconds of each
phase. Peak memory: the rows, the best index so far and the family being measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr

from aqe_retrieval.faiss_search import exact_knn, search_parameters
from aqe_retrieval.manifest import IndexCandidate, ServingIndexEntry, SkippedCandidate
from index_builder.heldout import QuerySample, search_held_out
from index_builder.knn import sample_rows, set_recall

logger = logging.getLogger(__name__)

NPROBE_LADDER = (4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
EF_LADDER = (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512)
"""efSearch values tried, 12-25 % apart: a query's cost grows about linearly with efSearch, so a
coarser ladder overshoots the target by up to a whole step. At 200,000 x 256 (synthetic) the
level-0 expansion index, HNSW32_SQ8, had recall@9 0.9688 at efSearch 48 and 0.9741 at 64 (0.34
and 0.45 ms a query): with 56 between them, the build can stop where 0.97 is first met."""
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 100
"""The links' construction breadth (FAISS's default is 40). Measured at 200,000 x 256 (synthetic,
held-out rows measured on links without them): the level-0 expansion index met recall@9 0.97 at
efSearch 56 (0.20 ms a query) with 40, at 32 (0.16 ms) with 100, at 24 (0.12 ms) with 200; the
serving index's recall@10 at efSearch 16 was 0.971, 0.988 and 0.988. The links took 43, 107 and
234 s to build (on a machine shared with another job), so 100: most of the gain for 2.5x the
time of the graph, the build's largest selection phase."""
TIME_QUERIES = 100
"""Single-query searches timed per configuration at most (the first rows of the sample)..."""
TIME_BUDGET_S = 0.5
"""... and no more once this long has passed and :data:`MIN_TIMED` were timed (flat search)."""
MIN_TIMED = 20
KMEANS_ROWS_PER_LIST = 40
"""k-means sample of the IVF quantizer: rows per list (FAISS asks for at least 39)."""
KMEANS_NITER = 10
"""k-means iterations of the IVF quantizer. At 200,000 x 256, nlist 2048: 30 rows a list and 10
iterations reached recall@10 0.962 at nprobe 128, 50 rows and 25 iterations 0.965, 1.6x slower."""
PQ_TRAIN = 16_384
"""Rows IVF-PQ's codebooks are trained on (64 per centroid of its 256-entry sub-quantizers)."""
KINDS = ("exact", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw", "hnsw-sq8")


@dataclass
class Shared:
    """What the selections of one build share: the HNSW links, built once over level 0's rows.

    Every level and the expanded rows hold the same n items in the same order, so one graph's
    links serve each of them with that level's rows as storage; recall is measured each time.
    ``builds`` counts the graphs built (tests check the winner is never built twice).
    """

    links: Any = None  # an IndexHNSWFlat whose ``hnsw`` holds the links (storage left empty)
    n: int = 0
    held: np.ndarray | None = None  # sorted rows left out of ``partial`` (None: no partial links)
    partial: Any = None  # the links over every row but ``held``, as ``links``
    order: np.ndarray | None = None  # node j of ``partial`` (and of the build) is row ``order[j]``
    builds: dict[str, int] = field(default_factory=dict)

    def holds(self, n: int, held: np.ndarray | None) -> bool:
        """Whether the links are over ``n`` rows, with partial links without ``held`` if given."""
        if self.links is None or self.n != n:
            return False
        return held is None or (self.held is not None and np.array_equal(self.held, held))

    def built(self, family: str) -> None:
        """Count one build of ``family`` (``hnsw``, ``ivf``)."""
        self.builds[family] = self.builds.get(family, 0) + 1


@dataclass
class Trial:
    """One measured configuration; ``index`` is dropped once it can no longer win."""

    method: str
    index: Any
    nprobe: int | None
    ef_search: int | None
    recall: float
    ms: float
    bytes: int
    final: Callable[[], Any] | None = None  # the index to keep, when not the one measured

    def record(self) -> IndexCandidate:
        """The manifest's record of this trial."""
        return IndexCandidate(
            method=self.method,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            recall_at_k=round(self.recall, 4),
            ms_per_query=round(self.ms, 4),
            bytes=self.bytes,
        )


def select_index(
    u: np.ndarray,
    queries: QuerySample,
    k: int,
    target: float,
    memory_budget_gib: float,
    seed: int = 0,
    block_size: int = 16384,
    what: str = "serving index",
    kinds: tuple[str, ...] = KINDS,
    graph_rows: np.ndarray | None = None,
    shared: Shared | None = None,
) -> tuple[Any, ServingIndexEntry]:
    """The chosen index over ``u`` (n, d) normalised rows and its manifest entry (candidates listed).

    ``graph_rows`` (n, d): the rows HNSW links are built over (default ``u``), unless ``shared``
    already holds links over n rows; new links are left in ``shared``.
    """
    t0 = time.perf_counter()
    n, d = u.shape
    budget = memory_budget_gib * 2**30
    shared = shared if shared is not None else Shared()
    phases: dict[str, float] = {}
    with _phase(phases, "truth"):
        truth = search_held_out(lambda xq, kk: exact_knn(xq, u, kk)[1], queries, k)
    trials: list[Trial] = []
    skipped: list[SkippedCandidate] = []
    best: Trial | None = None  # the cheapest meeting the target, else the most accurate

    rest_truth: np.ndarray | None = None  # the truth among the rows that are not held out

    def measure(
        method: str,
        index: Any,
        nprobe: int | None = None,
        ef: int | None = None,
        candidate: HnswCandidate | None = None,
    ) -> Trial:
        nonlocal best, rest_truth
        params = search_parameters(index, nprobe, ef)
        if method == "exact":
            recall = 1.0  # by construction: it is the truth
        elif candidate is not None and candidate.node_rows is not None:  # links without the held-out
            assert candidate.held is not None
            if rest_truth is None:
                with _phase(phases, "truth"):
                    rest_truth = truth_without(queries.xq, u, k, candidate.held)
            nodes = index.search(queries.xq, k, params=params)[1]
            rows = np.where(nodes >= 0, candidate.node_rows[np.maximum(nodes, 0)], -1)
            recall = set_recall(rows, rest_truth)
        else:
            found = search_held_out(lambda xq, kk: index.search(xq, kk, params=params)[1], queries, k)
            recall = set_recall(found, truth)
        final = candidate.final if candidate is not None else None
        trial = Trial(method, index, nprobe, ef, recall, 0.0, index_bytes(index), final)
        trial.ms = ms_per_query(index, params, queries.xq[:TIME_QUERIES], k + (queries.own is not None))
        trials.append(trial)
        logger.info(
            "%s auto: %s nprobe %s efSearch %s: recall@%d %.4f, %.3f ms/query, %.0f MiB",
            what, method, nprobe, ef, k, trial.recall, trial.ms, trial.bytes / 2**20,
        )  # fmt: skip
        if best is None or _better(trial, best, target):
            best = trial
        for other in trials:  # only the best index stays alive (besides the one being tuned)
            if other is not best:
                other.index = None
        return trial

    def ladder(
        method: str, index: Any, values: list[int], ivf: bool, candidate: HnswCandidate | None = None
    ) -> None:
        for value in values:
            nprobe, ef = (value, None) if ivf else (None, value)
            trial = measure(method, index, nprobe, ef, candidate)
            met = best is not None and best.recall >= target and best is not trial
            if trial.recall >= target or (met and best is not None and trial.ms > best.ms):
                return

    fits = []
    for kind, method, size in candidates(n, d, kinds):
        if size <= budget:
            fits.append((kind, method))
        else:
            reason = f"needs {size / 2**30:.2f} GiB > budget {memory_budget_gib} GiB"
            skipped.append(SkippedCandidate(method=method, reason=reason, bytes=size))
            logger.info("%s auto: %s skipped, %s", what, method, reason)
    finer = [method for kind, method in fits if kind in ("ivf-flat", "ivf-sq8")]
    if finer and any(kind == "ivf-pq" for kind, _ in fits):
        pq = next(method for kind, method in fits if kind == "ivf-pq")
        reason = f"{finer[-1]} fits the budget: PQ would trade recall for memory alone"
        skipped.append(SkippedCandidate(method=pq, reason=reason))
        logger.info("%s auto: %s skipped, %s", what, pq, reason)
        fits.remove(("ivf-pq", pq))
    if ("exact", "exact") in fits:
        with _phase(phases, "exact"):
            flat = faiss.IndexFlatIP(d)
            _add(flat, u, block_size)
            measure("exact", flat)
            del flat
    hnsw_kinds = {kind for kind, _ in fits if kind.startswith("hnsw")}
    if hnsw_kinds:
        family = hnsw_family(u, seed, block_size, hnsw_kinds, graph_rows, shared, phases, queries.own)
        for candidate in family:
            with _phase(phases, "hnsw_measure"):
                values = [e for e in EF_LADDER if e >= k] or [k]
                ladder(candidate.method, candidate.index, values, False, candidate)
            del candidate
    ivf_methods = [method for kind, method in fits if kind.startswith("ivf")]
    for method, index in ivf_family(u, seed, block_size, ivf_methods, shared, phases):
        nlist = faiss.extract_index_ivf(index).nlist
        with _phase(phases, "ivf_measure"):
            ladder(method, index, [p for p in NPROBE_LADDER if p < nlist] + [nlist], ivf=True)
        del index
    if best is None:
        raise ValueError(f"{what}: no candidate index fits the memory budget of {memory_budget_gib} GiB")
    if best.recall < target:
        logger.warning(
            "%s auto: no index within %s GiB reaches recall@%d %.2f; the most accurate, %s, has %.4f",
            what, memory_budget_gib, k, target, best.method, best.recall,
        )  # fmt: skip
    if best.final is not None:  # measured on the links without the held-out rows: keep them all
        best.index = None
        with _phase(phases, "hnsw_storage"):
            best.index = best.final()
    seconds = time.perf_counter() - t0
    logger.info(
        "%s auto: chose %s (nprobe %s, efSearch %s): recall@%d %.4f, %.3f ms/query; %d tried in %.1f s (%s)",
        what, best.method, best.nprobe, best.ef_search, k, best.recall, best.ms, len(trials), seconds,
        ", ".join(f"{name} {s:.1f} s" for name, s in phases.items()),
    )  # fmt: skip
    index = best.index
    entry = ServingIndexEntry(
        spec=best.method,
        index_type=type(faiss.downcast_index(index)).__name__,
        nprobe=best.nprobe,
        ef_search=best.ef_search,
        recall_at_k=round(best.recall, 4),
        recall_k=k,
        recall_sample=len(queries.xq),
        recall_queries=queries.source,
        recall_target=target,
        below_target=best.recall < target,
        ms_per_query=round(best.ms, 4),
        bytes=best.bytes,
        selection_seconds=round(seconds, 2),
        candidates=[t.record() for t in trials],
        skipped=skipped,
        selection_timings_s={name: round(s, 3) for name, s in phases.items()},
    )
    return index, entry


def _better(trial: Trial, best: Trial, target: float) -> bool:
    if (trial.recall >= target) != (best.recall >= target):
        return trial.recall >= target
    if trial.recall >= target:
        return trial.ms < best.ms
    return trial.recall > best.recall


def candidates(n: int, d: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, int]]:
    """``(kind, factory string, estimated bytes)`` of every candidate.

    IVF bytes count codes, list ids and the direct map (16 bytes a row) and the centroids.
    """
    nlist = ivf_nlist(n)
    m = pq_m(d)
    out = [("exact", "exact", 4 * n * d)]
    if n >= 39 * 2:  # fewer rows cannot train even two lists
        centroids = nlist * d * 4
        out += [
            ("ivf-flat", f"IVF{nlist},Flat", n * (4 * d + 16) + centroids),
            ("ivf-sq8", f"IVF{nlist},SQ8", n * (d + 16) + centroids),
            ("ivf-pq", f"IVF{nlist},PQ{m}", n * (m + 16) + centroids),
        ]
    out += [
        ("hnsw", f"HNSW{HNSW_M}", hnsw_bytes(n, d, 4)),
        ("hnsw-sq8", f"HNSW{HNSW_M}_SQ8", hnsw_bytes(n, d, 1)),
    ]
    return [c for c in out if c[0] in kinds]


def ivf_nlist(n: int) -> int:
    """nlist of the IVF candidates: the power of two nearest ``2 sqrt(n)``, at most ``n / 39``.

    Measured at 200,000 x 256 (synthetic, target recall@10 0.97): IVF1024 needed nprobe 128 for
    2.3 ms a query, IVF2048 nprobe 192 for 2.2 ms after k-means 3x as long, IVF512 96 for 3.5 ms.
    """
    nlist = int(2 ** round(np.log2(max(2 * np.sqrt(n), 1))))
    return max(1, min(nlist, 2 ** int(np.log2(max(n // 39, 1)))))


def hnsw_bytes(n: int, d: int, bytes_per_dim: int) -> int:
    """Estimated size of HNSW<M> over n rows: storage plus about ``2 M * 1.07`` links of 4 bytes a row."""
    return int(n * (bytes_per_dim * d + 2 * HNSW_M * 4 * 1.07 + 16))


def pq_m(d: int) -> int:
    """PQ sub-quantizers for dimension d: the largest divisor of d at most ``d / 4`` (8 bits each)."""
    return max(m for m in range(1, max(d // 4, 1) + 1) if d % m == 0)


def ivf_family(
    u: np.ndarray,
    seed: int,
    block_size: int,
    methods: list[str],
    shared: Shared | None = None,
    phases: dict[str, float] | None = None,
) -> Iterator[tuple[str, Any]]:
    """The IVF candidates ``methods``, one at a time: one quantizer trained, one assignment computed."""
    if not methods:
        return
    phases = phases if phases is not None else {}
    n, d = u.shape
    nlist = int(methods[0].removeprefix("IVF").split(",")[0])
    with _phase(phases, "ivf_train"):
        coarse: Any = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf0 = faiss.extract_index_ivf(coarse)
        ivf0.cp.niter = KMEANS_NITER
        ivf0.cp.seed = seed
        train = np.ascontiguousarray(u[sample_rows(n, KMEANS_ROWS_PER_LIST * nlist, seed)])
        coarse.train(train)
        if shared is not None:
            shared.built("ivf")
        quantizer = ivf0.quantizer
        centroids = quantizer.reconstruct_n(0, nlist)
    with _phase(phases, "ivf_assign"):
        assign = np.empty(n, dtype=np.int64)
        for lo in range(0, n, block_size):
            xb = np.ascontiguousarray(u[lo : lo + block_size])
            assign[lo : lo + len(xb)] = quantizer.search(xb, 1)[1][:, 0]
    for method in methods:
        with _phase(phases, "ivf_add"):
            index = (
                coarse
                if method.endswith(",Flat")
                else faiss.index_factory(d, method, faiss.METRIC_INNER_PRODUCT)
            )
            ivf = faiss.extract_index_ivf(index)
            if index is not coarse:
                ivf.quantizer.add(centroids)
                codec: Any = faiss.downcast_index(ivf)
                if hasattr(codec, "do_polysemous_training"):  # IVF-PQ: slow, and plain search ignores it
                    codec.do_polysemous_training = False
                # the codec only: the quantizer is trained and full. PQ's k-means per sub-space took
                # 206 of a 339 s selection at 200,000 x 256 on 102,400 rows: PQ_TRAIN rows suffice
                index.train(train[:PQ_TRAIN] if hasattr(codec, "pq") else train)
            for lo in range(0, n, block_size):
                xb, near = np.ascontiguousarray(u[lo : lo + block_size]), assign[lo : lo + block_size]
                ivf.add_core(len(xb), swig_ptr(xb), None, swig_ptr(near))
            ivf.make_direct_map()  # the service reconstructs rows for its exact fallback under filters
        yield method, index


@dataclass
class HnswCandidate:
    """One HNSW storage over the shared links: the index measured, and the index to keep.

    With held-out rows, ``index`` holds the links of every other row (node j is row
    ``node_rows[j]``) and ``final()`` makes the index over every row, in row order, from the same
    links completed; without, ``index`` is the one to keep (``final`` None).
    """

    method: str
    index: Any
    node_rows: np.ndarray | None = None
    held: np.ndarray | None = None
    final: Callable[[], Any] | None = None


def hnsw_family(
    u: np.ndarray,
    seed: int,
    block_size: int,
    kinds: set[str],
    graph_rows: np.ndarray | None = None,
    shared: Shared | None = None,
    phases: dict[str, float] | None = None,
    held: np.ndarray | None = None,
) -> Iterator[HnswCandidate]:
    """``HNSW32`` then ``HNSW32_SQ8`` over ``u`` (``kinds``: which), sharing one graph's links.

    The links come from ``shared`` when it holds links over as many rows (and without the same
    ``held`` rows), else they are built over ``graph_rows`` (default ``u``) and left in
    ``shared`` (:func:`build_links`). ``held``: the rows of the held-out queries, measured on the
    links of the other rows.
    """
    phases = phases if phases is not None else {}
    shared = shared if shared is not None else Shared()
    n, d = u.shape
    held = None if held is None else np.unique(np.asarray(held, dtype=np.int64))
    if held is not None and not 0 < len(held) < n:
        held = None
    if not shared.holds(n, held):
        with _phase(phases, "hnsw_build"):
            build_links(shared, u if graph_rows is None else graph_rows, held, block_size)
    storages: list[tuple[str, Any]] = []
    if "hnsw" in kinds:
        storages.append(
            (f"HNSW{HNSW_M}", faiss.index_factory(d, f"HNSW{HNSW_M}", faiss.METRIC_INNER_PRODUCT))
        )
    if "hnsw-sq8" in kinds:
        with _phase(phases, "hnsw_storage"):
            sq: Any = faiss.index_factory(d, f"HNSW{HNSW_M}_SQ8", faiss.METRIC_INNER_PRODUCT)
            sq.train(np.ascontiguousarray(u[sample_rows(n, 100_000, seed)]))
        storages.append((f"HNSW{HNSW_M}_SQ8", sq))
    for method, empty in storages:
        kept = faiss.clone_index(empty)  # trained, without rows: the index to keep, when made

        def final(kept: Any = kept) -> Any:
            return _with_links(kept, shared.links, u, None, block_size)

        with _phase(phases, "hnsw_storage"):
            if held is None:
                candidate = HnswCandidate(method, final())
            else:
                order = shared.order
                assert order is not None and shared.partial is not None
                rest = order[: n - len(held)]
                measured = _with_links(empty, shared.partial, u, rest, block_size)
                candidate = HnswCandidate(method, measured, rest, held, final)
        yield candidate
        del candidate


def build_links(shared: Shared, rows: np.ndarray, held: np.ndarray | None, block_size: int) -> None:
    """HNSW links over ``rows`` into ``shared``; with ``held``, first over every other row.

    The rows but ``held`` are inserted first and their links copied (``shared.partial``, node j
    is row ``shared.order[j]``); then the held rows are inserted too and the nodes renumbered to
    row order (``shared.links``). So the kept graph is one graph over all rows, built once.
    """
    n, d = rows.shape
    graph: Any = faiss.index_factory(d, f"HNSW{HNSW_M}", faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    partial: Any = None
    order: np.ndarray | None = None
    if held is None:
        _add(graph, rows, block_size)
    else:
        order = np.concatenate([np.setdiff1d(np.arange(n, dtype=np.int64), held), held])
        _add_rows(graph, rows, order[: n - len(held)], block_size)
        partial = faiss.index_factory(d, f"HNSW{HNSW_M}", faiss.METRIC_INNER_PRODUCT)
        partial.hnsw = graph.hnsw  # a copy of the links so far
        _add_rows(graph, rows, held, block_size)
        graph.permute_entries(np.argsort(order).astype(np.int64))  # node i is row i
    links: Any = faiss.index_factory(d, f"HNSW{HNSW_M}", faiss.METRIC_INNER_PRODUCT)
    links.hnsw = graph.hnsw  # a copy of the links, without the rows they were built over
    shared.links, shared.n, shared.held, shared.partial, shared.order = links, n, held, partial, order
    shared.built("hnsw")


def _with_links(empty: Any, links: Any, u: np.ndarray, rows: np.ndarray | None, block_size: int) -> Any:
    """``empty`` (an HNSW index without rows) with ``u[rows]`` (default: all) stored and ``links``."""
    index = empty
    if rows is None:
        _add(index.storage, u, block_size)
    else:
        _add_rows(index.storage, u, rows, block_size)
    index.hnsw = links.hnsw
    index.ntotal = index.storage.ntotal
    return index


def truth_without(xq: np.ndarray, u: np.ndarray, k: int, held: np.ndarray) -> np.ndarray:
    """Exact top-``k`` rows (m, k) of ``xq`` among the rows of ``u`` that are not in ``held``."""
    n = len(u)
    extra = 16
    while True:
        ids = exact_knn(xq, u, min(k + extra, n))[1]
        keep = ~np.isin(ids, held) & (ids >= 0)
        if (keep.sum(axis=1) >= k).all() or k + extra >= n:
            break
        extra *= 4
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept columns, in rank order
    out = np.take_along_axis(ids, first, axis=1)
    return np.where(np.take_along_axis(keep, first, axis=1), out, -1)


def index_bytes(index: Any) -> int:
    """Bytes ``index`` holds in memory: codes, ids, direct map, centroids, graph links."""
    index = faiss.downcast_index(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.ntotal * (ivf.code_size + 16) + ivf.nlist * ivf.d * 4)
    if isinstance(index, faiss.IndexHNSW):
        h: Any = index.hnsw
        links = h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
        return int(links + index_bytes(index.storage))
    return int(index.ntotal * index.code_size) if hasattr(index, "code_size") else 4 * index.ntotal * index.d


def ms_per_query(index: Any, params: Any, xq: np.ndarray, k: int) -> float:
    """Median milliseconds of one single-query search, FAISS on one thread (as the service runs).

    Times up to ``len(xq)`` queries, fewer once :data:`TIME_BUDGET_S` has passed (at least
    :data:`MIN_TIMED`): a flat scan of 200,000 x 256 takes 18 ms a query.
    """
    times: list[float] = []
    start = time.perf_counter()
    with _faiss_threads(1):
        for i in range(-min(5, len(xq)), len(xq)):  # the first few warm up, untimed
            q = xq[abs(i) : abs(i) + 1]
            t = time.perf_counter()
            index.search(q, k, params=params)
            if i >= 0:
                times.append(time.perf_counter() - t)
                if len(times) >= MIN_TIMED and time.perf_counter() - start > TIME_BUDGET_S:
                    break
    return float(np.median(times) * 1000) if times else 0.0


@contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t


@contextmanager
def _faiss_threads(threads: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _add_rows(index: Any, u: np.ndarray, rows: np.ndarray, block_size: int) -> None:
    for lo in range(0, len(rows), block_size):
        index.add(np.ascontiguousarray(u[rows[lo : lo + block_size]], dtype=np.float32))


def _add(index: Any, u: np.ndarray, block_size: int, progress: Callable[[int], None] | None = None) -> None:
    for lo in range(0, u.shape[0], block_size):
        index.add(np.ascontiguousarray(u[lo : lo + block_size]))
        if progress:
            progress(min(block_size, u.shape[0] - lo))
