"""A whole ``index-builder build`` at scale: wall time, peak RSS, graph recall, serving recall.

Generates structured data (synthetic.py), runs the build in a child process (peak RSS from
``wait4``), and prints the manifest's phase timings and measured recalls. With ``--exact-sample``
it also extrapolates the exact all-pairs kNN time, the anchor an approximate graph is judged
against, two ways: ``faiss.knn`` of ``--exact-sample`` rows against all rows (linear in the rows
searched) and the builder's own exact route (the symmetric kernel) over the first ``--sym-rows``
rows (it scales as N^2).

    python benchmarks/bench_build.py --n 1000000 --d 256 --knn IVF2048,Flat --nprobe 192 \\
        --batch-lists --serving-index auto
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_expand import run_child  # noqa: E402
from synthetic import generate  # noqa: E402


def exact_extrapolation(data: Path, sample: int) -> float:
    """Seconds exact kNN over all rows would take, from timing ``sample`` rows against all."""
    from aqe_retrieval.aqe import normalize_rows
    from aqe_retrieval.faiss_search import exact_knn

    x = np.load(data, mmap_mode="r")
    u, _ = normalize_rows(x)
    t0 = time.perf_counter()
    exact_knn(u[:sample], u, 10)
    return (time.perf_counter() - t0) * len(u) / sample


def symmetric_extrapolation(data: Path, rows: int, k: int = 10) -> float:
    """Seconds the builder's exact kernel would take over all rows, from its time on ``rows``."""
    from aqe_retrieval.aqe import normalize_rows
    from index_builder.symmetric import symmetric_self_knn

    x = np.load(data, mmap_mode="r")
    m = min(rows, len(x))
    u, _ = normalize_rows(np.asarray(x[:m]))
    t0 = time.perf_counter()
    symmetric_self_knn(u, k)
    return (time.perf_counter() - t0) * (len(x) / m) ** 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--knn", default="IVF2048,Flat")
    p.add_argument("--nprobe", type=int, default=192)
    p.add_argument("--batch-lists", action="store_true", help="the builder's --batch-lists")
    p.add_argument("--serving-index", default="auto")
    p.add_argument("--serving-nprobe", type=int, help="default: auto's measured choice")
    p.add_argument("--qe-k", type=int, default=10)
    p.add_argument(
        "--exact-sample", type=int, default=2000, help="rows timed for the exact-kNN extrapolation (0: skip)"
    )
    p.add_argument(
        "--sym-rows", type=int, default=100_000, help="rows the symmetric exact kernel is timed on (0: skip)"
    )
    p.add_argument("--data", type=Path, help="use this .npy instead of generating one")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        data = a.data or Path(tmp) / "gallery.npy"
        if a.data is None:
            t0 = time.perf_counter()
            generate(data, a.n, a.d, seed=1)
            print(f"generated {a.n} x {a.d} in {time.perf_counter() - t0:.0f}s", flush=True)
        root = Path(tmp) / "root"
        cmd = [
            sys.executable,
            "-m",
            "index_builder.cli",
            "build",
            "--gallery",
            str(data),
            "--root",
            str(root),
            "--qe-k",
            str(a.qe_k),
            "--knn",
            a.knn,
            "--serving-index",
            a.serving_index,
            "--no-progress",
        ]
        if a.nprobe:
            cmd += ["--nprobe", str(a.nprobe)]
        if a.serving_nprobe:
            cmd += ["--serving-nprobe", str(a.serving_nprobe)]
        if a.batch_lists:
            cmd += ["--batch-lists"]
        wall, peak = run_child(cmd)
        version = (root / "current").read_text().strip()
        m = json.loads((root / "versions" / version / "manifest.json").read_text())
        result = {
            "n": m["n"],
            "d": m["d"],
            "knn": a.knn,
            "nprobe": a.nprobe,
            "batch_lists": a.batch_lists,
            "serving_index": m["serving_index"],
            "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak, 2),
            "graph_recall": m["graph_recall"],
            "graph_recall_sample": m["graph_recall_sample"],
            "timings_s": m["timings_s"],
        }
        if a.exact_sample:
            est = exact_extrapolation(data, a.exact_sample)
            result["exact_knn_extrapolated_s"] = round(est, 1)
            result["knn_speedup_vs_exact"] = round(est / m["timings_s"]["knn"], 1)
        if a.sym_rows:
            est = symmetric_extrapolation(data, a.sym_rows)
            result["exact_symmetric_extrapolated_s"] = round(est, 1)
            result["knn_speedup_vs_exact_symmetric"] = round(est / m["timings_s"]["knn"], 1)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
