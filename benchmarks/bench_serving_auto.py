"""``--serving-index auto`` at scale: expand a gallery, select, check on another held-out sample.

    python benchmarks/synthetic.py --n 200000 --d 256 --out var/g200k.npy
    PYTHONPATH=$PWD python benchmarks/bench_serving_auto.py var/g200k.npy [--knn auto]

Prints the chosen entry (every candidate tried, with recall@10, single-thread ms per query and
bytes), the selection time, and recall@10 of the chosen index on a second held-out sample of
1,000 online-expanded queries (a sample the selection never saw).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from aqe_retrieval import aqe
from aqe_retrieval.faiss_search import exact_knn, search_parameters
from aqe_retrieval.online import GalleryLevel, expand_online
from index_builder.config import ServingSpec
from index_builder.expansion import AqeParams, Expansion
from index_builder.heldout import QuerySample, drop_own
from index_builder.inputs import open_embeddings
from index_builder.knn import KnnSpec, sample_rows, set_recall
from index_builder.serving import build_serving_index


def held_out(levels: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray, qe_k: int) -> QuerySample:
    """Gallery ``rows`` expanded online against the rest (exact level search, own row removed)."""

    def level(r: np.ndarray, norms: np.ndarray) -> GalleryLevel:
        return GalleryLevel(r, norms, lambda q, k: drop_own(exact_knn(q, r, k + 1)[1], rows, k))

    first, norms = levels[0]
    raw = first[rows] * norms[rows][:, None]
    xq = aqe.normalize_rows(expand_online(raw, [level(r, n) for r, n in levels], qe_k, 3.0))[0]
    return QuerySample(np.ascontiguousarray(xq), rows, "held-out gallery rows")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--knn", default="auto")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t = time.perf_counter()
    expansion = Expansion(open_embeddings(a.data), AqeParams(), KnnSpec(method=a.knn), show_progress=False)
    levels = [(lv.rows.copy(), lv.norms.copy()) for lv in expansion]
    u = expansion.expanded
    aqe.normalize_rows_inplace(u, 16384)
    print(f"expansion {time.perf_counter() - t:.1f} s, graph recall {expansion.report.graph_recall}")
    n = len(u)
    queries = held_out(levels, sample_rows(n, 1000, 0), 10)
    t = time.perf_counter()
    index, entry = build_serving_index(u, ServingSpec(method="auto"), 16384, False, queries=queries)
    print(f"selection {time.perf_counter() - t:.1f} s")
    print(entry.model_dump_json(indent=1))
    check = held_out(levels, sample_rows(n, 1000, 7), 10)
    assert check.own is not None
    truth = drop_own(exact_knn(check.xq, u, 11)[1], check.own, 10)
    params = search_parameters(index, entry.nprobe, entry.ef_search)
    found = drop_own(index.search(check.xq, 11, params=params)[1], check.own, 10)
    print(f"recall@10 on another held-out sample: {set_recall(found, truth):.4f}")


if __name__ == "__main__":
    main()
