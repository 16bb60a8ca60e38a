"""``add`` of 1 % and ``delete`` of 0.5 % of the rows against a full build, in one run.

    PYTHONPATH=$PWD python3 benchmarks/bench_incremental.py --n 100000 --d 64 --work /tmp/bench-inc

Prints each step's seconds, the ratio to the full build, and the disk each new version adds
(files not hard-linked from its parent) against a full version's size.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from aqe_retrieval import artifact
from index_builder.cli import main


def new_bytes(root: Path, version: str) -> int:
    """Bytes of ``version``'s files that no other version shares (its delta and manifest)."""
    base = artifact.version_dir(root, version)
    return sum(p.stat().st_size for p in base.iterdir() if p.stat().st_nlink == 1)


def run(n: int, d: int, work: Path, qe_times: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(work / "g.npy", rng.standard_normal((n, d)).astype(np.float32))
    (work / "ids.txt").write_text("".join(f"r{i}\n" for i in range(n)))
    m = n // 100
    np.save(work / "add.npy", rng.standard_normal((m, d)).astype(np.float32))
    (work / "add.txt").write_text("".join(f"a{i}\n" for i in range(m)))
    gone = rng.choice(n, n // 200, replace=False)
    (work / "del.txt").write_text("".join(f"r{i}\n" for i in gone))
    root = work / "root"
    opts = ["--knn", "exact", "--serving-index", "exact", "--expansion-index", "exact", "--no-progress"]
    t = time.perf_counter()
    main(["build", "--gallery", str(work / "g.npy"), "--ids", str(work / "ids.txt"), "--root", str(root),
          "--qe-times", str(qe_times), "--keep", "10", *opts])  # fmt: skip
    t_build = time.perf_counter() - t
    full = sum(
        p.stat().st_size for p in artifact.version_dir(root, artifact.current_version(root) or "").iterdir()
    )
    t = time.perf_counter()
    main(["add", "--root", str(root), "--gallery", str(work / "add.npy"), "--ids", str(work / "add.txt")])
    t_add = time.perf_counter() - t
    added = new_bytes(root, artifact.current_version(root) or "")
    t = time.perf_counter()
    main(["delete", "--root", str(root), "--ids", str(work / "del.txt")])
    t_del = time.perf_counter() - t
    deleted = new_bytes(root, artifact.current_version(root) or "")
    print(f"n={n} d={d} qe_times={qe_times}: full build {t_build:.2f}s, {full / 2**20:.1f} MiB")
    print(f"add {m} rows: {t_add:.2f}s ({t_add / t_build:.3f} of a build), {added / 2**20:.2f} MiB "
          f"({added / full:.3f} of a version)")  # fmt: skip
    print(f"delete {len(gone)} rows: {t_del:.2f}s ({t_del / t_build:.3f} of a build), "
          f"{deleted / 2**20:.2f} MiB "
          f"({deleted / full:.3f} of a version)")  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--qe-times", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-incremental"))
    a = p.parse_args()
    run(a.n, a.d, a.work, a.qe_times)
