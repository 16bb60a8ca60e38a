"""The indexes a build publishes for search: the serving index, and per-level expansion indexes.

``auto`` serves small galleries exactly and otherwise chooses among candidate indexes by measured
held-out recall and per-query cost (:mod:`index_builder.serving_auto`); with a given nprobe it
picks an IVF that fits the memory budget (:func:`choose_serving_method`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from aqe_retrieval import artifact
from aqe_retrieval.faiss_search import exact_knn, search_by_lists, search_parameters
from index_builder.config import AUTO, AUTO_EXACT_MAX_N, AUTO_NPROBE_LADDER, BuildConfig, ServingSpec
from index_builder.flat_file import write_flat_index
from index_builder.heldout import QuerySample, search_held_out
from index_builder.knn import KnnSpec, build_index, sample_rows, set_recall
from index_builder.ondisk import OnDiskLists
from index_builder.progress import progress
from index_builder.serving_auto import Shared, select_index

logger = logging.getLogger(__name__)


def build_serving_index(
    u: np.ndarray,
    spec: ServingSpec,
    block_size: int,
    show_progress: bool | None = None,
    what: str = "serving index",
    queries: QuerySample | None = None,
    graph_rows: np.ndarray | None = None,
    shared: Shared | None = None,
    lists: OnDiskLists | None = None,
    flat_limit: int | None = None,
) -> tuple[Any, artifact.ServingIndexEntry]:
    """The index searched by the service over ``u`` (n, d) normalised expanded rows.

    ``auto`` serves up to ``spec.exact_max_n`` rows exactly; above, it chooses the fastest
    candidate whose recall@k on ``queries`` meets the target (:func:`~index_builder.
    serving_auto.select_index`; ``queries`` default: held-out gallery rows of ``u``), unless
    ``nprobe`` is given (then :func:`choose_serving_method` picks an IVF that fits). For an
    approximate index, recall@k against exact search is measured on ``queries`` (or gallery
    rows used as queries); IVF indexes get a direct map (8 bytes a row) so that the service can
    reconstruct rows for its exact fallback under filters. ``graph_rows`` and ``shared``: the
    rows HNSW candidates' links are built over and what the build's selections share
    (:class:`~index_builder.serving_auto.Shared`).

    Out of core, ``lists`` puts an IVF index's inverted lists on disk, a flat index is written
    in blocks into ``lists.scratch`` and mapped from there (:mod:`index_builder.flat_file`), and
    ``auto`` does not choose flat search when its ``4 n d`` bytes exceed ``flat_limit`` (the
    build's memory: a mapped flat index is searched from the page cache).
    """
    n, d = u.shape
    nprobe = spec.nprobe
    method = spec.method
    if method.lower() == AUTO:
        method, reason = choose_serving_method(
            n, d, spec.memory_budget_gib, _exact_max_n(spec, n, d, flat_limit)
        )
        # out of core (lists), auto keeps choose_serving_method's IVF, whose lists can go on
        # disk: the candidates' race builds each candidate in memory
        if method != "exact" and nprobe is None and spec.ef_search is None and lists is None:
            logger.info("%s auto: %d rows > %d, trying candidates", what, n, spec.exact_max_n)
            if queries is None:
                rows = sample_rows(n, spec.recall_sample, spec.seed)
                queries = QuerySample(np.ascontiguousarray(u[rows]), rows, "held-out gallery rows")
            return select_index(
                u, queries, min(spec.recall_k, n - 1), spec.recall_target, spec.memory_budget_gib,
                spec.seed, block_size, what, spec.candidates, graph_rows, shared,
            )  # fmt: skip
        logger.info("%s auto: %s (%s)", what, method, reason)
    knn_spec = KnnSpec(method=method, seed=spec.seed)
    with progress(what, n, enabled=show_progress) as update:
        if knn_spec.exact and lists is not None:  # out of core: flat rows streamed to a mapped file
            index = write_flat_index(lists.scratch / f"{lists.ivfdata.stem}.flat.faiss", u, block_size)
            update(n)
        else:
            index = build_index(u, knn_spec, block_size, update, lists=lists)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    entry = artifact.ServingIndexEntry(
        spec=method, index_type=describe(index), nprobe=nprobe, ef_search=spec.ef_search
    )
    if not knn_spec.exact:
        k = min(spec.recall_k, n)
        if queries is None:
            rows = sample_rows(n, spec.recall_sample, spec.seed)
            queries = QuerySample(np.ascontiguousarray(u[rows]), None, "gallery rows")
        truth = search_held_out(lambda xq, kk: exact_knn(xq, u, kk)[1], queries, k)

        def recall(nprobe: int | None) -> float:
            if lists is not None:  # on-disk lists: each list read once for all the sample queries
                by_lists = search_held_out(
                    lambda xq, kk: search_by_lists(index, xq, kk, nprobe)[1], queries, k
                )
                return set_recall(by_lists, truth)
            params = search_parameters(index, nprobe, spec.ef_search)
            found = search_held_out(lambda xq, kk: index.search(xq, kk, params=params)[1], queries, k)
            return set_recall(found, truth)

        if spec.method.lower() == AUTO and nprobe is None and ivf is not None:
            nprobe, entry.recall_at_k = tune_nprobe(recall, ivf.nlist, spec.recall_target, what)
            entry.nprobe = nprobe
        else:
            entry.recall_at_k = recall(nprobe)
        entry.recall_k, entry.recall_sample = k, len(queries.xq)
        entry.recall_queries, entry.recall_target = queries.source, spec.recall_target
        entry.below_target = entry.recall_at_k < spec.recall_target
        logger.info(
            "%s %s (nprobe %s): recall@%d %.4f on %d %s",
            what,
            method,
            nprobe,
            k,
            entry.recall_at_k,
            len(queries.xq),
            queries.source,
        )
        if entry.below_target:
            logger.warning(
                "%s: recall@%d %.4f is below the target %.2f", what, k, entry.recall_at_k, spec.recall_target
            )
    return index, entry


def expansion_index(
    rows: np.ndarray,
    config: BuildConfig,
    level: int,
    shared: Shared | None = None,
    lists: OnDiskLists | None = None,
) -> tuple[Any, artifact.ServingIndexEntry | None]:
    """The index online expansion searches in a level whose graph was exact, or (None, None).

    An exact graph leaves no index, and a flat scan of every row per query costs what exact
    serving does (4 ms at 100,000 x 256). Above ``exact_max_n`` rows (or when flat rows do
    not fit the serving memory budget) this chooses the index as ``--serving-index auto``
    does, for the recall of the top ``qe_k - 1`` neighbours (what expansion takes) of held-out
    rows of the level (each row's own row removed), against exact search. When flat search
    wins, the level keeps no index (None) and the entry says what was tried. ``shared``: what
    the build's selections share (the HNSW links built here serve the later ones). ``lists``:
    on-disk inverted lists, out of core ("exact" builds nothing, so it always fits).
    """
    n, d = rows.shape
    serving = config.serving
    if choose_serving_method(n, d, serving.memory_budget_gib, serving.exact_max_n)[0] == "exact":
        return None, None
    spec = ServingSpec(
        method=AUTO,
        recall_k=max(config.params.qe_k - 1, 1),
        recall_sample=serving.recall_sample,
        seed=serving.seed,
        memory_budget_gib=serving.memory_budget_gib,
        recall_target=serving.recall_target,
        exact_max_n=serving.exact_max_n,
        candidates=serving.candidates,
    )
    u = np.ascontiguousarray(rows, dtype=np.float32)
    held_out = sample_rows(n, spec.recall_sample, spec.seed)
    queries = QuerySample(np.ascontiguousarray(u[held_out]), held_out, "held-out level rows")
    what = f"level {level} expansion index"
    index, entry = build_serving_index(
        u, spec, config.block_size, config.show_progress, what, queries, shared=shared, lists=lists
    )
    if entry.spec == "exact":
        return None, entry
    return index, entry


def _exact_max_n(spec: ServingSpec, n: int, d: int, flat_limit: int | None) -> int:
    """``spec.exact_max_n``, or 0 (no flat search) when flat rows exceed the build's memory."""
    return 0 if flat_limit is not None and 4 * n * d > flat_limit else spec.exact_max_n


def serves_exactly(spec: ServingSpec, n: int, d: int) -> bool:
    """Whether ``spec`` serves n rows of dimension d by flat search: ``exact``, or ``auto`` when small."""
    method = spec.method.lower()
    if method in ("exact", "flat"):
        return True
    return (
        method == AUTO and choose_serving_method(n, d, spec.memory_budget_gib, spec.exact_max_n)[0] == "exact"
    )


def choose_serving_method(
    n: int, d: int, memory_budget_gib: float, exact_max_n: int = AUTO_EXACT_MAX_N
) -> tuple[str, str]:
    """The serving index ``auto`` picks for n rows of dimension d: (factory string, reason).

    Exact (flat, ``4 n d`` bytes) up to ``exact_max_n`` rows; above, or when flat does not
    fit, ``IVF<nlist>`` with nlist the power of two nearest ``4 sqrt(n)`` (at most n / 39, the
    rows k-means needs per list) and the finest storage within the budget: Flat (``4 d`` bytes a
    row), SQ8 (``d``), PQ<m> (``m``), each plus 16 bytes a row (list id, direct map). Raises
    ``ValueError`` when even the smallest PQ does not fit.
    """
    budget = memory_budget_gib * 2**30
    flat = 4 * n * d
    if n <= exact_max_n and flat <= budget:
        return "exact", f"{n} rows <= {exact_max_n}: flat search, {flat / 2**30:.2f} GiB"
    nlist = int(2 ** round(np.log2(max(4 * np.sqrt(n), 1))))
    nlist = min(nlist, 2 ** int(np.log2(max(n // 39, 1))))  # a power of two <= n / 39
    why = (
        f"{n} rows > {exact_max_n}"
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


def tune_nprobe(recall: Callable[[int], float], nlist: int, target: float, what: str) -> tuple[int, float]:
    """The smallest nprobe of the ladder whose ``recall(nprobe)`` reaches ``target``."""
    ladder = [p for p in AUTO_NPROBE_LADDER if p < nlist] + [nlist]
    for nprobe in ladder:
        value = recall(nprobe)
        if value >= target:
            return nprobe, value
    logger.warning("%s: recall %.4f < target %.2f even with all %d lists probed", what, value, target, nlist)
    return nprobe, value


def describe(index: Any) -> str:
    """The FAISS class name of ``index`` (e.g. ``IndexIVFFlat``), as the manifest records it."""
    return type(faiss.downcast_index(index)).__name__
