"""Out-of-core builds: peak memory under a fixed budget as N grows, against the unlimited build.

For each N (synthetic N x d rows, ``synthetic.py``) the build runs with ``--memory-budget`` in a
memory cgroup of its own (no limit: the cgroup only counts), sampled every 50 ms: peak
anonymous memory (``total_rss``: heaps, tiles, FAISS's arrays) and the peak charged to the
cgroup (``memory.max_usage_in_bytes``: anonymous + page cache, which the kernel reclaims under a
limit). Where the in-memory build fits this machine it runs too, for the time ratio. Then the
largest version is served in a cgroup *limited* to the budget: p50 of single queries over HTTP,
the service's anonymous memory and the builder's measured recall of the compressed index.

    python benchmarks/bench_out_of_core.py --sizes 500000,1000000 --budget 1GiB --data-dir var/ooc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from memcg import MemoryCgroup, unavailable  # noqa: E402
from servers import free_port, stop, wait_http  # noqa: E402
from synthetic import generate  # noqa: E402

from index_builder.budget import format_size, parse_size  # noqa: E402


def build(data: Path, root: Path, args: argparse.Namespace, budget: str | None) -> dict:
    """One ``index-builder build`` in a counting cgroup: seconds, peak anonymous and charged bytes."""
    argv = [sys.executable, "-m", "index_builder.cli", "build", "--gallery", str(data), "--root", str(root)]
    argv += ["--knn", args.knn, "--nprobe", str(args.nprobe), "--batch-lists", "--no-progress"]
    argv += ["--serving-index", args.serving_index, "--serving-nprobe", str(args.serving_nprobe)]
    argv += ["--level-dtype", args.level_dtype] + (["--memory-budget", budget] if budget else [])
    with MemoryCgroup(2**62, "aqe-bench") as cg:
        t0 = time.perf_counter()
        done = cg.run(argv, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        seconds = time.perf_counter() - t0
        charged = cg.max_usage()
    if done.returncode != 0:
        raise RuntimeError(f"build failed ({done.returncode}): {done.stderr[-2000:]}")
    try:
        summary = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"the build's stdout is not its JSON summary: {done.stdout[:500]!r}") from exc
    return {"seconds": seconds, "anon": cg.peak_rss, "charged": charged, "summary": summary}


def serve(root: Path, dim: int, limit: int, queries: int) -> dict:
    """p50/p99 of single-query HTTP searches of ``root`` by a service in a cgroup of ``limit``."""
    import httpx

    port = free_port()
    with MemoryCgroup(limit, "aqe-bench-svc") as cg:
        env = {**os.environ, "PYTHONPATH": str(HERE.parent), "AQE_INDEX_ROOT": str(root)}
        env |= {"AQE_PORT": str(port), "AQE_RELOAD_INTERVAL_S": "0", "AQE_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen(cg.command([sys.executable, "-m", "service.main"]), env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", 120)
            rng = np.random.default_rng(1)
            xq = rng.standard_normal((queries, dim)).astype(np.float32)
            took, peak = [], 0
            with httpx.Client(timeout=60) as client:
                for q in xq:
                    t0 = time.perf_counter()
                    r = client.post(f"{url}/search", json={"embedding": q.tolist(), "k": 10})
                    took.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise RuntimeError(r.text)
                    peak = max(peak, cg.stat().get("total_rss", 0))
            stat = cg.stat()
        finally:
            stop(proc, 30)
    ms = np.array(took) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "anon": peak,
        "cache": stat.get("total_cache", 0),
        "alive": proc.returncode in (0, -15),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="500000,1000000,2000000")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--budget", default="1GiB")
    p.add_argument("--knn", default="IVF1024,Flat")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--serving-index", default="IVF1024,SQ8")
    p.add_argument("--serving-nprobe", type=int, default=32)
    p.add_argument("--level-dtype", default="float16")
    p.add_argument("--unlimited-max-n", type=int, default=1_000_000, help="largest N also built in memory")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--data-dir", type=Path, default=Path("var"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if reason := unavailable():
        sys.exit(f"needs a memory cgroup: {reason}")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    root = None
    for n in [int(v) for v in args.sizes.split(",")]:
        data = args.data_dir / f"ooc_{n}x{args.d}.npy"
        if not data.exists():
            generate(data, n, args.d)
        root = args.data_dir / f"ooc_root_{n}"
        row = {"n": n, "budgeted": build(data, root, args, args.budget)}
        if n <= args.unlimited_max_n:
            row["unlimited"] = build(data, args.data_dir / f"ooc_root_{n}_unlimited", args, None)
        rows.append(row)
        b = row["budgeted"]
        line = (
            f"N={n:>9,} budget {args.budget}: {b['seconds']:7.1f} s, peak anon {format_size(b['anon'])}, "
            f"charged {format_size(b['charged'])}"
        )
        if "unlimited" in row:
            u = row["unlimited"]
            line += (
                f" | unlimited: {u['seconds']:7.1f} s, peak anon {format_size(u['anon'])}; "
                f"time ratio {b['seconds'] / u['seconds']:.2f}, anon ratio {b['anon'] / u['anon']:.2f}"
            )
        print(line, flush=True)
    assert root is not None
    served = serve(root, args.d, parse_size(args.budget), args.queries)
    largest = rows[-1]["budgeted"]["summary"]
    files = sum(f.stat().st_size for f in (root / "versions" / largest["version"]).iterdir())
    print(
        f"service, N={rows[-1]['n']:,} ({largest['serving_index']}, {format_size(files)} of files) in a "
        f"{args.budget} cgroup: p50 {served['p50_ms']:.2f} ms, p99 {served['p99_ms']:.2f} ms, "
        f"anon {format_size(served['anon'])}, page cache {format_size(served['cache'])}, "
        f"builder's recall@10 {largest['serving_recall']}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "service": served}, indent=2, default=str))


if __name__ == "__main__":
    main()
