"""A/B of search-service variants on one published index: interleaved rounds, ratios to the first.

Each variant is ``NAME=SRC[:VAR=VALUE,...]``: ``search-service`` run from source tree ``SRC`` (an
export of another commit, e.g. ``git archive HEAD | tar -x -C /tmp/base``, or ``.``) with those
extra environment variables. Every variant serves the same ``--root`` on its own port; each round
drives every variant in turn with the lean client of http_load.py (its own process) at each
concurrency, so all of them see the same background load. Reported: the median over rounds of
q/s, p50 and p99 per variant, and each variant's q/s and p50 as a ratio to the first variant's,
with the load average before and after.

    python benchmarks/ab_http.py --root var/vs/synthetic_200000x256_root_auto \\
        --queries var/vs/synthetic_200000x256_queries.npy --variant base=/tmp/base --variant new=.
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
from http_load import run_in_subprocess  # noqa: E402
from servers import free_port, stop, wait_http  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """``NAME=SRC[:VAR=VALUE,...]`` -> (name, source tree, extra environment)."""
    name, _, rest = text.partition("=")
    src, _, extra = rest.partition(":")
    if not name or not src:
        raise SystemExit(f"--variant {text!r}: expected NAME=SRC[:VAR=VALUE,...]")
    env = dict(item.split("=", 1) for item in extra.split(",") if item)
    return name, Path(src).resolve(), env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="an index root (index-builder build)")
    p.add_argument("--queries", type=Path, required=True, help=".npy of (q, d) float32 queries")
    p.add_argument("--variant", action="append", required=True, help="NAME=SRC[:VAR=VALUE,...]")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--path", default="/search", help="/healthz: the HTTP stack alone")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    variants = [parse_variant(v) for v in a.variant]
    queries = np.load(a.queries)
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    procs: list[subprocess.Popen] = []
    urls: dict[str, str] = {}
    res: dict = {"load_start": [round(v, 2) for v in os.getloadavg()], "rounds": []}
    try:
        for name, src, extra in variants:
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(src),
                "AQE_INDEX_ROOT": str(a.root.resolve()),
                "AQE_PORT": str(port),
                "AQE_LOG_LEVEL": "WARNING",
                "AQE_RELOAD_INTERVAL_S": "0",
                **extra,
            }
            cmd = [sys.executable, "-m", "service.main"]
            procs.append(subprocess.Popen(cmd, env=env, cwd=src, stdout=subprocess.DEVNULL))
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            wait_http(f"{url}/readyz")
        time.sleep(1.0)
        for _ in range(a.rounds):
            row: dict = {}
            for c in (int(v) for v in a.concurrency.split(",")):
                for name, url in urls.items():
                    row[f"{name}@{c}"] = run_in_subprocess(url, queries, a.k, c, a.seconds, work, path=a.path)
            res["rounds"].append(row)
    finally:
        for proc in procs:
            stop(proc, grace_s=60)
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=2), file=sys.stderr)
    first = variants[0][0]
    for c in (int(v) for v in a.concurrency.split(",")):
        med = {
            name: {
                key: float(np.median([r[f"{name}@{c}"][key] for r in res["rounds"]]))
                for key in ("qps", "p50_ms", "p99_ms")
            }
            for name, _, _ in variants
        }
        for name, m in med.items():
            ratio = m["qps"] / med[first]["qps"]
            lat = m["p50_ms"] / med[first]["p50_ms"]
            print(
                f"{c:>3} clients {name:>10}: {m['qps']:8.0f} q/s  p50 {m['p50_ms']:.3f} ms  "
                f"p99 {m['p99_ms']:.3f} ms  | x{ratio:.2f} q/s, p50 x{lat:.2f} of {first}"
            )
    print(f"load average: start {res['load_start']}, end {res['load_end']}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
