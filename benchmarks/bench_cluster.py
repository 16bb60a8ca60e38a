"""The cluster build against the single-process build at equal total cores, on this machine.

    PYTHONPATH=$PWD python3 benchmarks/bench_cluster.py --n 20000 --d 128 --workers 1 2 \\
        --knn exact --out /tmp/bench_cluster

For each worker count W: a single-process build with ``--threads W`` and a cluster build on a
``LocalCluster`` of W single-threaded worker processes (``--memory-limit`` each), same data and
parameters. Reported per run: wall seconds per phase, the ratio single / cluster, the task
stream's per-phase task count and the spread of task durations (max / median: the balance),
each worker's peak anonymous memory (``RssAnon`` sampled every 20 ms: no file pages of the
memory-mapped arrays; ``ru_maxrss`` is no use here, a spawned worker inherits its parent's) and
its disk I/O (``/proc/self/io``). Bytes each phase moves are
the design's formulas (README "Cluster build"), evaluated for the run's N, d, k, nprobe and
partitioning; nothing is extrapolated to other machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_builder.build import build
from index_builder.cluster import ClusterSpec
from index_builder.config import BuildConfig, ServingSpec
from index_builder.expansion import AqeParams
from index_builder.knn import KnnSpec


def _rss_anon() -> int:
    """This process's anonymous resident memory now (``RssAnon``: no file pages, no page cache)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _start_sampler(dask_worker: Any) -> None:
    """In a worker: sample RssAnon every 20 ms until :func:`_stop_sampler` (state on the worker)."""
    import threading

    done, peak = threading.Event(), [0]
    by_phase: dict[str, tuple[int, int]] = {}  # phase: (most a task grew RssAnon, peak RssAnon)
    started: dict[str, int] = {}  # task key: RssAnon when first seen running
    base = _rss_anon()

    def run() -> None:
        while not done.is_set():
            now = _rss_anon()
            peak[0] = max(peak[0], now)
            # the phase is the running task's function (submit() keys are "<function>-<uuid4>")
            running = {str(ts.key) for ts in list(dask_worker.state.executing)}
            for key in running - started.keys():
                started[key] = now
            for key in running:
                name = key.split("-", 1)[0]
                grown, top = by_phase.get(name, (0, 0))
                by_phase[name] = (max(grown, now - started[key]), max(top, now))
            done.wait(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # functions sent by client.run share no globals: the state lives on the worker
    dask_worker.aqe_sampler = (done, peak, thread, by_phase, base)


def _stop_sampler(dask_worker: Any) -> dict[str, Any]:
    """The sampled peak RssAnon, its peak above the idle worker per phase, the disk I/O."""
    done, peak, thread, by_phase, base = dask_worker.aqe_sampler
    done.set()
    thread.join()
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {
        "peak_anon": peak[0],
        "idle_anon": base,
        "by_phase": by_phase,
        "read_bytes": int(io["read_bytes"]),
        "write_bytes": int(io["write_bytes"]),
        "rchar": int(io["rchar"]),
        "wchar": int(io["wchar"]),
    }


def traffic(n: int, d: int, k: int, nprobe: int, tile: int, groups: int, qe_times: int) -> dict[str, int]:
    """Bytes read + written per phase by the design (one level; the expansion per round)."""
    blocks = -(-n // tile)
    pairs = blocks * (blocks + 1) // 2
    return {
        "read+normalise": n * d * 4 * 2 + n * 4,
        "knn exact (tile pairs)": pairs * 2 * tile * d * 4 + 2 * n * k * 12 * blocks,
        "knn exact (merge)": 2 * n * k * 12 * blocks + n * k * 12,
        "knn ivf (assign)": n * d * 4 + n * nprobe * 4,
        "knn ivf (list groups)": groups * n * nprobe * 4 + n * d * 4 + n * nprobe * (d * 4 + k * 12),
        "knn ivf (merge)": n * nprobe * k * 12 + n * k * 12,
        "expand (per round)": n * k * d * 4 + n * (d * 4 + k * 8) + n * (d + 1) * 4,
        "levels": qe_times * n * d * 4,
    }


def run(args: argparse.Namespace, n: int, workers: int) -> dict:
    from distributed import LocalCluster, get_task_stream

    out = Path(args.out)
    gallery = out / f"gallery_{n}.npy"
    method = f"IVF{max(1, n // args.list_rows)},Flat" if args.list_rows else args.knn
    knn = KnnSpec() if method == "exact" else KnnSpec(method=method, nprobe=args.nprobe)
    params = AqeParams(qe_k=args.k, qe_times=args.qe_times)
    # an explicit serving index: ``auto`` races candidates in one process, not on a cluster
    serving = ServingSpec(method=args.serving, nprobe=args.serving_nprobe)
    common = dict(gallery=gallery, params=params, knn=knn, serving=serving, show_progress=False)
    root = out / f"single_{n}_{workers}"
    shutil.rmtree(root, ignore_errors=True)
    single, single_s = None, None
    if args.single_up_to is None or n <= args.single_up_to:
        t0 = time.perf_counter()
        single = build(BuildConfig(root=root, threads=workers, **common))  # type: ignore[arg-type]
        single_s = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
    import dask

    with (
        dask.config.set({"distributed.worker.memory.terminate": False}),  # as cluster.connect
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=args.memory_limit,
        ) as cluster,
        cluster.get_client() as client,
    ):
        root = out / f"cluster_{n}_{workers}"
        shutil.rmtree(root, ignore_errors=True)
        client.run(_start_sampler)
        with get_task_stream(client) as stream:
            t0 = time.perf_counter()
            got = build(BuildConfig(root=root, cluster=ClusterSpec(cluster.scheduler_address), **common))  # type: ignore[arg-type]
            cluster_s = time.perf_counter() - t0
        peaks = client.run(_stop_sampler)
    durations: dict[str, list[float]] = defaultdict(list)
    for task in stream.data:
        # submit() keys are "<function>-<uuid4>": the function names the phase
        name = task["key"].split("-", 1)[0] if isinstance(task["key"], str) else str(task["key"])
        compute = [s for s in task["startstops"] if s["action"] == "compute"]
        durations[name] += [s["stop"] - s["start"] for s in compute]
    balance = {
        name: {
            "tasks": len(v),
            "total_s": round(sum(v), 2),
            "median_s": round(statistics.median(v), 3),
            "max_over_median": round(max(v) / max(statistics.median(v), 1e-9), 2),
        }
        for name, v in durations.items()
    }
    mib = 2**20
    return {
        "n": n,
        "gallery_mib": round(n * args.d * 4 / mib),
        "workers": workers,
        "knn": method,
        "single_s": round(single_s, 2) if single_s is not None else None,
        "cluster_s": round(cluster_s, 2),
        "single_over_cluster": round(single_s / cluster_s, 2) if single_s is not None else None,
        "single_timings": single.timings_s if single is not None else None,
        "cluster_timings": got.timings_s,
        "task_balance": balance,
        "worker_memory_limit": args.memory_limit,
        "worker_peak_anon_mib": sorted(round(v["peak_anon"] / mib) for v in peaks.values()),
        "worker_idle_anon_mib": sorted(round(v["idle_anon"] / mib) for v in peaks.values()),
        # per phase (task function), over both workers: [the most one task grew RssAnon from
        # its start, the worker's peak RssAnon while a task of the phase ran]
        "worker_phase_anon_mib": {
            name: [
                round(max(v["by_phase"].get(name, (0, 0))[i] for v in peaks.values()) / mib) for i in (0, 1)
            ]
            for name in sorted({name for v in peaks.values() for name in v["by_phase"]})
        },
        "worker_disk_read_mib": sorted(round(v["read_bytes"] / mib) for v in peaks.values()),
        "worker_disk_write_mib": sorted(round(v["write_bytes"] / mib) for v in peaks.values()),
        "worker_read_syscall_mib": sorted(round(v["rchar"] / mib) for v in peaks.values()),
        "client_anon_now_mib": round(_rss_anon() / mib),  # after the single build in this process too
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[20000])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--qe-times", type=int, default=1)
    p.add_argument("--knn", default="exact")
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument(
        "--list-rows", type=int, default=None, help="IVF graph with N / this many lists (overrides --knn)"
    )
    p.add_argument(
        "--single-up-to", type=int, default=None, help="skip the single-process build above this N"
    )
    p.add_argument("--serving", default="IVF256,Flat", help="serving index (both builds)")
    p.add_argument("--serving-nprobe", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--memory-limit", default="1GiB")
    p.add_argument("--out", default="/tmp/bench_cluster")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        arr = np.lib.format.open_memmap(
            out / f"gallery_{n}.npy", mode="w+", dtype=np.float32, shape=(n, args.d)
        )
        rng = np.random.default_rng(0)
        for lo in range(0, n, 65536):
            arr[lo : lo + 65536] = rng.standard_normal((min(65536, n - lo), args.d), dtype=np.float32)
        arr.flush()
        del arr
    results = [run(args, n, w) for n in args.n for w in args.workers]
    print(
        json.dumps(
            {"d": args.d, "k": args.k, "knn": args.knn, "nprobe": args.nprobe, "runs": results}, indent=2
        )
    )
    for n in args.n:
        print(json.dumps({"n": n, **traffic(n, args.d, args.k, args.nprobe, 2048, 1, args.qe_times)}))


if __name__ == "__main__":
    main()
