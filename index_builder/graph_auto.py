"""``--knn auto``: exact kNN while it is cheap, else an IVF graph whose nprobe meets the recall target.

Up to :data:`GRAPH_EXACT_MAX_N` rows the exact symmetric kernel is cheap (README: 163,062 x 384
in 58 s on 2 cores; it grows as N^2 d), and exact is what every approximate graph is judged
against. Above, an ``IVF<nlist>,Flat`` index (nlist the power of two nearest ``4 sqrt(n)``, at
most n / 39) is trained and filled once; nprobe climbs :data:`GRAPH_NPROBE_LADDER` until the
recall of the top-k sets of a seeded sample of rows (the measure of
:func:`~index_builder.knn.self_knn`) reaches ``spec.recall_target``; the graph is then searched
list by list (``index_builder.ivf_batch``) in that same index. Tuning costs one search of the
sample per step, not a graph.

Every graph, asked for or chosen, is checked against its target: below it is a warning here, a
field of the manifest, and a refusal when the build's quality gate is on.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from aqe_retrieval.faiss_search import exact_knn, search_by_lists, search_parameters
from index_builder.knn import (
    AUTO,
    EXACT,
    KnnMemory,
    KnnResult,
    KnnSpec,
    build_index,
    sample_rows,
    self_knn,
    set_recall,
)
from index_builder.pool import Progress

logger = logging.getLogger(__name__)

GRAPH_EXACT_MAX_N = 250_000
"""``--knn auto`` runs exact kNN up to this many rows (250,000 x 256: about 90 s on 2 cores)."""
GRAPH_NPROBE_LADDER = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
"""nprobe values ``auto`` tries, smallest first (the 1M x 256 synthetic set needs 256 of 4096)."""


def graph_knn(
    u: np.ndarray,
    k: int,
    spec: KnnSpec,
    block_size: int,
    progress: Progress | None = None,
    workers: int | None = None,
    exact_max_n: int = GRAPH_EXACT_MAX_N,
    memory: KnnMemory | None = None,
) -> KnnResult:
    """The kNN graph of ``u`` (n, d) float32 as ``spec`` asks, ``auto`` resolved; checks its recall.

    ``memory``: the memory budget's share (:class:`~index_builder.knn.KnnMemory`), passed on.
    """
    if spec.method.lower() != AUTO:
        result = self_knn(u, k, spec, block_size, progress, workers, memory=memory)
    elif u.shape[0] <= exact_max_n:
        logger.info("kNN auto: exact (%d rows <= %d)", u.shape[0], exact_max_n)
        exact = replace(spec, method=EXACT, batch_lists=None)
        result = self_knn(u, k, exact, block_size, progress, workers, memory=memory)
    else:
        result = tuned_ivf_graph(u, k, spec, block_size, progress, workers, memory)
    below_target(result.recall, spec.recall_target)
    return result


def tuned_ivf_graph(
    u: np.ndarray,
    k: int,
    spec: KnnSpec,
    block_size: int,
    progress: Progress | None = None,
    workers: int | None = None,
    memory: KnnMemory | None = None,
) -> KnnResult:
    """An ``IVF<nlist>,Flat`` graph with the smallest nprobe of the ladder reaching the target."""
    n = u.shape[0]
    nlist = graph_nlist(n)
    ivf_spec = replace(spec, method=f"IVF{nlist},Flat", nprobe=None)
    lists = memory.lists if memory is not None else None
    index = build_index(u, ivf_spec, block_size, lists=lists)
    rows = sample_rows(n, spec.recall_sample, spec.seed)
    xq = np.ascontiguousarray(u[rows])
    truth = exact_knn(xq, u, k)[1]
    tried: list[dict[str, Any]] = []
    ladder = [p for p in GRAPH_NPROBE_LADDER if p < nlist] + [nlist]
    for nprobe in ladder:
        if lists is not None:  # on-disk lists: read each once for all the sample rows
            found = search_by_lists(index, xq, k, nprobe)[1]
        else:
            found = index.search(xq, k, params=search_parameters(index, nprobe, None))[1]
        tried.append({"nprobe": nprobe, "recall": round(set_recall(found, truth), 4)})
        if tried[-1]["recall"] >= spec.recall_target:
            break
    logger.info(
        "kNN auto: IVF%d,Flat nprobe %d (sample recall@%d %.4f, target %.2f; tried %s)",
        nlist,
        nprobe,
        k,
        tried[-1]["recall"],
        spec.recall_target,
        [t["nprobe"] for t in tried],
    )
    chosen = replace(ivf_spec, nprobe=nprobe, batch_lists=spec.batch_lists)
    result = self_knn(u, k, chosen, block_size, progress, workers, index=index, memory=memory)
    return replace(result, tried=tuple(tried))


def graph_nlist(n: int) -> int:
    """The power of two nearest ``4 sqrt(n)``, at most ``n / 39`` (rows k-means needs per list)."""
    nlist = int(2 ** round(np.log2(max(4 * np.sqrt(n), 1))))
    return max(1, min(nlist, 2 ** int(np.log2(max(n // 39, 1)))))


def below_target(recall: float | None, target: float) -> bool:
    """Whether a graph's measured ``recall`` is below ``target`` (logged as a warning)."""
    if recall is None or recall >= target:
        return False
    logger.warning(
        "kNN graph recall %.4f is below its target %.2f: raise --nprobe (or use --knn auto / exact)",
        recall,
        target,
    )
    return True
