"""``index-builder expand`` against the dense reference ``aqe``, side by side in one run.

For each size, both run in their own fresh process on the same structured data (see
synthetic.py); the parent reads each child's wall time and peak RSS (``wait4``) and prints the
ratios. The reference is the numpy port kept in ``tests/reference.py`` (fast-reid's ``aqe``: a
dense N x N similarity matrix and a per-row loop); it is skipped where its N x N matrix cannot
fit (``--ref-max-n``).

    python benchmarks/bench_expand.py                      # N = 20,000 and 100,000, d = 512
    python benchmarks/bench_expand.py --sizes 5000 --d 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import generate  # noqa: E402


def run_child(args: list[str]) -> tuple[float, float]:
    """Run a child process; returns (wall seconds, peak RSS in GiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def reference_child(data: str, out: str, qe_k: int, alpha: float) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from reference import reference_aqe

    g = np.load(data)
    _, expanded, _ = reference_aqe(g[:0], g, 1, qe_k, alpha)
    np.save(out, expanded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,100000", help="comma-separated N")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--qe-k", type=int, default=10)
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument(
        "--ref-max-n",
        type=int,
        default=30000,
        help="largest N the dense reference is run at (its matrix is 4 N^2 bytes)",
    )
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--_reference", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._reference:
        return reference_child(*a._reference, a.qe_k, a.alpha)

    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        for n in (int(s) for s in a.sizes.split(",")):
            data = Path(tmp) / f"g{n}.npy"
            generate(data, n, a.d, seed=n)
            ours_out, ref_out = Path(tmp) / "ours.npy", Path(tmp) / "ref.npy"
            ours_s, ours_gib = run_child(
                [
                    sys.executable,
                    "-m",
                    "index_builder.cli",
                    "expand",
                    str(data),
                    str(ours_out),
                    "--qe-k",
                    str(a.qe_k),
                    "--alpha",
                    str(a.alpha),
                    "--no-progress",
                ]
            )
            row = {"n": n, "d": a.d, "ours_s": ours_s, "ours_peak_gib": ours_gib}
            if n <= a.ref_max_n:
                ref_s, ref_gib = run_child(
                    [
                        sys.executable,
                        __file__,
                        "--qe-k",
                        str(a.qe_k),
                        "--alpha",
                        str(a.alpha),
                        "--_reference",
                        str(data),
                        str(ref_out),
                    ]
                )
                ours, ref = np.load(ours_out), np.load(ref_out)
                err = float((np.abs(ours - ref).max(axis=1) / np.linalg.norm(ref, axis=1)).max())
                row.update(
                    ref_s=ref_s,
                    ref_peak_gib=ref_gib,
                    speedup=ref_s / ours_s,
                    memory_fraction=ours_gib / ref_gib,
                    max_rel_diff=err,
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
            for f in (data, ours_out, ref_out):
                f.unlink(missing_ok=True)

    print(
        f"\n{'N':>8} {'d':>5} {'expand s':>9} {'peak GiB':>9} {'ref s':>8} {'ref GiB':>8} "
        f"{'speedup':>8} {'mem frac':>9} {'max rel diff':>13}"
    )
    for r in rows:
        ref = (
            f"{r['ref_s']:>8.1f} {r['ref_peak_gib']:>8.2f} {r['speedup']:>7.1f}x "
            f"{r['memory_fraction']:>9.3f} {r['max_rel_diff']:>13.1e}"
            if "ref_s" in r
            else f"{'(reference skipped: N x N does not fit)':>51}"
        )
        print(f"{r['n']:>8} {r['d']:>5} {r['ours_s']:>9.1f} {r['ours_peak_gib']:>9.2f} {ref}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
