"""``--serving-index auto`` at scale: a whole default build, then its choice checked on another sample.

    python benchmarks/synthetic.py --n 200000 --d 256 --out var/g200k.npy
    PYTHONPATH=$PWD python benchmarks/bench_serving_auto.py var/g200k.npy --root var/bench-auto

Runs ``build`` with default settings (``--knn auto``, ``--serving-index auto``, ``--expansion-index
auto``) and prints the build's timings, each selection's time by phase, what it chose (every
candidate tried, with recall@10, single-thread ms per query and bytes, and those skipped with
why), and recall@10 of the served index on a second held-out sample of 1,000 gallery rows
expanded online the way the service expands them (a sample the selection never saw), against
exact search over the expanded rows, with its ms per query on that sample.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np

from aqe_retrieval import artifact
from aqe_retrieval.faiss_search import exact_knn, search_parameters
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams, expand_source
from index_builder.heldout import expanded_queries, search_held_out
from index_builder.inputs import open_embeddings
from index_builder.knn import KnnSpec, sample_rows, set_recall
from index_builder.serving_auto import ms_per_query


def expanded_rows(art: artifact.Artifact, data: Path, knn: str) -> np.ndarray:
    """The normalised expanded rows: read back from a float serving index, else expanded again."""
    index = faiss.downcast_index(art.serving_index)
    storage = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if isinstance(storage, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return storage.reconstruct_n(0, art.manifest.n)
    u, _ = expand_source(open_embeddings(data), AqeParams(), KnnSpec(method=knn), show_progress=False)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--knn", default="auto")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t = time.perf_counter()
    manifest = build(BuildConfig(gallery=a.data, root=a.root, knn=KnnSpec(method=a.knn), show_progress=False))
    print(f"build {time.perf_counter() - t:.1f} s, load average {os.getloadavg()}")
    print(f"build timings (s): {manifest.timings_s}")
    for level in manifest.levels:
        print(f"level {level.level}: {level.index_type} nprobe {level.nprobe} efSearch {level.ef_search}")
        print(f"  recall@{level.recall_k} {level.recall_at_k}; selection (s): {level.selection_timings_s}")
    entry = manifest.serving_index
    print(f"serving: selection {entry.selection_seconds} s by phase {entry.selection_timings_s}")
    print(entry.model_dump_json(indent=1))

    art = artifact.load(a.root)
    u = expanded_rows(art, a.data, a.knn)
    check = expanded_queries(
        art.levels, manifest.effective_qe_k, manifest.alpha, rows=sample_rows(len(u), 1000, 7)
    )
    truth = search_held_out(lambda xq, kk: exact_knn(xq, u, kk)[1], check, 10)
    params = search_parameters(art.serving_index, entry.nprobe, entry.ef_search)
    found = search_held_out(lambda xq, kk: art.serving_index.search(xq, kk, params=params)[1], check, 10)
    ms = ms_per_query(art.serving_index, params, check.xq[:200], 11)
    print(f"another held-out sample (seed 7): recall@10 {set_recall(found, truth):.4f}, {ms:.3f} ms/query")


if __name__ == "__main__":
    main()
