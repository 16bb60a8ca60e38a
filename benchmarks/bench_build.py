"""A whole ``index-builder build`` at scale: wall time, peak RSS, graph recall, serving recall.

Generates structured data (synthetic.py), runs the build in a child process (peak RSS from
``wait4``), and prints the manifest's phase timings and measured recalls. With ``--exact-sample``
it also times exact kNN on a sample of rows and extrapolates the exact all-pairs time, the anchor
an approximate graph is judged against.

    python benchmarks/bench_build.py --n 1000000 --d 256 --knn IVF4096,Flat --nprobe 16 \\
        --serving-index IVF4096,Flat --serving-nprobe 16
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
    from index_builder.aqe import normalize_rows
    from index_builder.knn import exact_knn

    x = np.load(data, mmap_mode="r")
    u, _ = normalize_rows(x)
    t0 = time.perf_counter()
    exact_knn(u[:sample], u, 10)
    return (time.perf_counter() - t0) * len(u) / sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--knn", default="IVF4096,Flat")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--serving-index", default="IVF4096,Flat")
    p.add_argument("--serving-nprobe", type=int, default=16)
    p.add_argument("--qe-k", type=int, default=10)
    p.add_argument("--exact-sample", type=int, default=2000,
                   help="rows timed for the exact-kNN extrapolation (0: skip)")
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
        cmd = [sys.executable, "-m", "index_builder.cli", "build", "--gallery", str(data),
               "--root", str(root), "--qe-k", str(a.qe_k), "--knn", a.knn,
               "--serving-index", a.serving_index, "--no-progress"]
        if a.nprobe:
            cmd += ["--nprobe", str(a.nprobe)]
        if a.serving_nprobe:
            cmd += ["--serving-nprobe", str(a.serving_nprobe)]
        wall, peak = run_child(cmd)
        version = (root / "current").read_text().strip()
        m = json.loads((root / "versions" / version / "manifest.json").read_text())
        result = {
            "n": m["n"], "d": m["d"], "knn": a.knn, "nprobe": a.nprobe,
            "serving_index": a.serving_index, "serving_nprobe": a.serving_nprobe,
            "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2),
            "graph_recall": m["graph_recall"], "graph_recall_sample": m["graph_recall_sample"],
            "serving_recall_at_10": m["serving_index"]["recall_at_k"],
            "timings_s": m["timings_s"],
        }
        if a.exact_sample:
            est = exact_extrapolation(data, a.exact_sample)
            result["exact_knn_extrapolated_s"] = round(est, 1)
            result["knn_speedup_vs_exact"] = round(est / m["timings_s"]["knn"], 1)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
