"""``add`` of 1 % and ``delete`` of 0.5 % of the rows against a full build, in one run.

    PYTHONPATH=$PWD python3 benchmarks/bench_incremental.py --n 100000 --d 64 --work /tmp/bench-inc

Prints each step's seconds, the ratio to the full build, and the disk each new version adds
(files not hard-linked from its parent) against a full version's size. The build uses the
default settings (``auto``: approximate graph, serving and expansion indexes at this size);
``--exact`` builds exact ones instead. For each version it also prints the indexes served, the
delta's served rows (searched exactly beside the masked base index, ``aqe_retrieval/overlay.py``)
and the median latency of single-query searches (1 FAISS thread).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import generate

from aqe_retrieval import artifact
from aqe_retrieval.overlay import DeltaIndex
from aqe_retrieval.searcher import Searcher
from index_builder.cli import main

EXACT = ["--knn", "exact", "--serving-index", "exact", "--expansion-index", "exact"]


def new_bytes(root: Path, version: str) -> int:
    """Bytes of ``version``'s files that no other version shares (its delta and manifest)."""
    base = artifact.version_dir(root, version)
    return sum(p.stat().st_size for p in base.iterdir() if p.stat().st_nlink == 1)


def describe(root: Path, queries: np.ndarray) -> str:
    """The current version's indexes, delta size and median single-query latency."""
    art = artifact.load(root)
    s = Searcher(art)
    m = art.manifest
    kinds = [m.serving_index.spec, *(lv.index_type for lv in m.levels)]
    delta = art.serving_index.pos.size if isinstance(art.serving_index, DeltaIndex) else 0
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        s.search(queries[:1], 10)
        times = []
        for q in queries:
            t = time.perf_counter()
            s.search(q[None], 10)
            times.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(threads)
    return f"indexes {kinds}, delta served rows {delta}, {1000 * np.median(times):.2f} ms/query"


def run(n: int, d: int, work: Path, qe_times: int, exact: bool, data: str, build_opts: list[str]) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    m = n // 100
    if data == "synthetic":  # identities (benchmarks/synthetic.py); the added rows are more of them
        generate(work / "all.npy", n + m, d, seed=0)
        rows = np.load(work / "all.npy", mmap_mode="r")
        np.save(work / "g.npy", rows[:n])
        np.save(work / "add.npy", rows[n:])
        del rows
        (work / "all.npy").unlink()
    else:
        np.save(work / "g.npy", rng.standard_normal((n, d)).astype(np.float32))
        np.save(work / "add.npy", rng.standard_normal((m, d)).astype(np.float32))
    (work / "ids.txt").write_text("".join(f"r{i}\n" for i in range(n)))
    (work / "add.txt").write_text("".join(f"a{i}\n" for i in range(m)))
    gone = rng.choice(n, n // 200, replace=False)
    (work / "del.txt").write_text("".join(f"r{i}\n" for i in gone))
    root = work / "root"
    opts = [*(EXACT if exact else []), *build_opts, "--no-progress"]
    queries = rng.standard_normal((200, d)).astype(np.float32)
    t = time.perf_counter()
    main(["build", "--gallery", str(work / "g.npy"), "--ids", str(work / "ids.txt"), "--root", str(root),
          "--qe-times", str(qe_times), "--keep", "10", *opts])  # fmt: skip
    t_build = time.perf_counter() - t
    built = describe(root, queries)
    full = sum(
        p.stat().st_size for p in artifact.version_dir(root, artifact.current_version(root) or "").iterdir()
    )
    t = time.perf_counter()
    main(["add", "--root", str(root), "--gallery", str(work / "add.npy"), "--ids", str(work / "add.txt")])
    t_add = time.perf_counter() - t
    added = new_bytes(root, artifact.current_version(root) or "")
    after_add = describe(root, queries)
    t = time.perf_counter()
    main(["delete", "--root", str(root), "--ids", str(work / "del.txt")])
    t_del = time.perf_counter() - t
    deleted = new_bytes(root, artifact.current_version(root) or "")
    after_delete = describe(root, queries)
    print(f"build options {opts}, {data} data")
    print(f"n={n} d={d} qe_times={qe_times}: full build {t_build:.2f}s, {full / 2**20:.1f} MiB; {built}")
    print(f"add {m} rows: {t_add:.2f}s ({t_add / t_build:.3f} of a build), {added / 2**20:.2f} MiB "
          f"({added / full:.3f} of a version); {after_add}")  # fmt: skip
    print(f"delete {len(gone)} rows: {t_del:.2f}s ({t_del / t_build:.3f} of a build), "
          f"{deleted / 2**20:.2f} MiB "
          f"({deleted / full:.3f} of a version); {after_delete}")  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--qe-times", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-incremental"))
    p.add_argument("--exact", action="store_true", help="exact graph, serving and expansion indexes")
    p.add_argument(
        "--data", choices=["gaussian", "synthetic"], default="gaussian",
        help="i.i.d. Gaussian rows, or identities from benchmarks/synthetic.py",
    )  # fmt: skip
    p.add_argument(
        "--build-opt", default="", help="more `build` options, e.g. '--knn IVF4096,Flat --nprobe 64'"
    )
    a = p.parse_args()
    run(a.n, a.d, a.work, a.qe_times, a.exact, a.data, shlex.split(a.build_opt))
