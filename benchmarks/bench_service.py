"""The search service over HTTP against raw in-process FAISS on the same index, in one run.

Builds an index from structured synthetic data (by default the kNN graph and the serving index
both ``IVF1024,Flat`` at nprobe 16: the graph's index is what online expansion searches, so a
flat one would make every query scan the whole gallery), then measures:
  * raw in-process, the anchors: the serving index's ``search`` of one query (FAISS alone), the
    same with online query expansion (``Searcher.search``: what one request computes), and
    batch-32 throughput of ``Searcher.search``, the best of one thread with FAISS's default
    threads and one thread per core with one FAISS thread each;
  * HTTP (``search-service`` in its own process(es), ``AQE_WORKERS``; the lean keep-alive
    client of http_load.py in another process): single-query p50/p99 with one client, the floor
    of the HTTP stack (``GET /healthz``), and throughput with 1 .. 64 concurrent clients;
  * memory of the worker processes: RSS, and PSS/USS (what each process holds alone), against
    the size of the version's files, to show the workers share one memory-mapped index.
  * with ``--profile`` (needs ``pip install py-spy``): where the worker processes' time goes under
    32 clients, sampled by py-spy: FAISS searches, the rest of each search (expansion arithmetic,
    checks), the batcher's bookkeeping, and the HTTP stack on the event loop; and the CPU cores
    the server and the client use.
Client and server share this machine's cores, so the HTTP figures include the client's own cost.

    python benchmarks/bench_service.py                       # 100,000 x 256, one worker
    python benchmarks/bench_service.py --workers 2 --concurrency 1,8,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from http_load import run_in_subprocess  # noqa: E402
from servers import free_port, stop, wait_http  # noqa: E402
from synthetic import generate  # noqa: E402


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.array(samples) * 1000
    return round(float(np.percentile(a, 50)), 3), round(float(np.percentile(a, 99)), 3)


def timed(fn, queries: np.ndarray, repeat: int) -> list[float]:
    out = []
    for i in range(repeat):
        q = queries[i % len(queries)][None]
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return out


def batch_qps(searcher, queries: np.ndarray, k: int, seconds: float, threads: int) -> float:
    """Queries/s of ``threads`` threads each searching batches of 32 back to back."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        i = slot * 32
        while time.perf_counter() < stop:
            lo = i % (len(queries) - 32)
            searcher.search(queries[lo : lo + 32], k)
            done[slot] += 32
            i += 32 * threads

    t0 = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(s,)) for s in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def raw_batch32_qps(searcher, queries: np.ndarray, k: int, seconds: float) -> float:
    """The raw anchor: batch-32 q/s now, the better of a thread a core and one thread with FAISS
    on every core. Leaves FAISS at one thread (as the service's workers search).
    """
    import faiss

    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(1)
    per_core = batch_qps(searcher, queries, k, seconds, cores)
    faiss.omp_set_num_threads(cores)
    one = batch_qps(searcher, queries, k, seconds, 1)
    faiss.omp_set_num_threads(1)
    return round(max(per_core, one), 1)


def raw_anchors(root: Path, queries: np.ndarray, k: int, repeat: int, seconds: float) -> dict:
    import faiss

    from aqe_retrieval import artifact
    from aqe_retrieval.aqe import normalize_rows
    from aqe_retrieval.searcher import Searcher

    s = Searcher(artifact.load(root))
    s.warm_up()
    index = s.artifact.serving_index
    params = (
        faiss.SearchParametersIVF(nprobe=s.manifest.serving_index.nprobe or 1)
        if faiss.try_extract_index_ivf(index) is not None
        else None
    )
    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(1)  # as the service runs each search (AQE_THREADS=1)
    res: dict = {}
    res["raw_faiss_p50_ms"], res["raw_faiss_p99_ms"] = percentiles(
        timed(lambda q: index.search(normalize_rows(q)[0], k, params=params), queries, repeat)
    )
    res["raw_aqe_p50_ms"], res["raw_aqe_p99_ms"] = percentiles(
        timed(lambda q: s.search(q, k), queries, repeat)
    )
    per_core = batch_qps(s, queries, k, seconds, cores)
    faiss.omp_set_num_threads(cores)
    one_thread = batch_qps(s, queries, k, seconds, 1)
    res["raw_batch32_qps_threads_per_core"] = round(per_core, 1)
    res["raw_batch32_qps_one_thread"] = round(one_thread, 1)
    res["raw_batch32_qps"] = round(max(per_core, one_thread), 1)
    return res


def memory(server: subprocess.Popen, files_bytes: int) -> dict:
    """RSS / PSS / USS of the service's worker processes (children of uvicorn's supervisor)."""
    top = psutil.Process(server.pid)
    procs = top.children(recursive=True) or [top]
    rows = []
    for p in procs:
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        rows.append(
            {
                "pid": p.pid,
                "rss_mib": round(m.rss / 2**20, 1),
                "pss_mib": round(m.pss / 2**20, 1),
                "uss_mib": round(m.uss / 2**20, 1),
            }
        )
    return {"index_files_mib": round(files_bytes / 2**20, 1), "processes": rows}


def profile(
    server: subprocess.Popen, url: str, queries: np.ndarray, k: int, seconds: float, workdir: Path
) -> dict:
    """py-spy samples of the service's processes under 32 clients, grouped by where they are."""
    import shutil

    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    top = psutil.Process(server.pid)
    procs = [top, *top.children(recursive=True)]
    cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    load = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "http_load.py"),
            url,
            str(workdir / "http_load_queries.npy"),
            "--k",
            str(k),
            "--clients",
            "32",
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    client = psutil.Process(load.pid)
    time.sleep(1.0)
    t0 = time.perf_counter()
    outs = []
    spies = []
    for p in procs:
        out = workdir / f"spy-{p.pid}.txt"
        outs.append(out)
        spies.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(p.pid),
                    "--duration",
                    str(max(1, int(seconds - 2))),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    client_cpu0 = sum(client.cpu_times()[:2])
    for sp in spies:
        sp.wait()
    wall = time.perf_counter() - t0
    client_cpu = sum(client.cpu_times()[:2]) - client_cpu0
    server_cpu = sum(sum(p.cpu_times()[:2]) - cpu0[p.pid] for p in procs)
    figures = json.loads(load.communicate()[0])
    # py-spy counts a thread blocked in SimpleQueue.get as running: "batcher_waiting" is idle
    groups = {
        "faiss_search": 0,
        "rest_of_search": 0,
        "batcher": 0,
        "batcher_waiting": 0,
        "http_event_loop": 0,
    }
    for out in outs:
        if not out.exists():
            continue
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if "Batcher._run" in stack:
                if ".search (faiss/" in stack or "replacement_search" in stack:
                    groups["faiss_search"] += int(count)
                elif "Searcher.search" in stack:
                    groups["rest_of_search"] += int(count)
                elif stack.rsplit(";", 1)[-1].startswith("Batcher._run "):
                    groups["batcher_waiting"] += int(count)
                else:
                    groups["batcher"] += int(count)
            elif "_run_once" in stack or "Runner.run" in stack or "run_asgi" in stack:
                groups["http_event_loop"] += int(count)
    total = max(1, sum(groups.values()))
    return {
        "qps_while_sampled": figures["qps"],
        "server_cores": round(server_cpu / wall, 2),
        "client_cores": round(client_cpu / wall, 2),
        "shares_of_server_samples": {g: round(c / total, 3) for g, c in groups.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--knn", default="IVF1024,Flat", help="the graph (and online expansion) index")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--serving-index", default="IVF1024,Flat")
    p.add_argument("--serving-nprobe", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2000, help="raw single-query timings")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement of throughput")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--workers", type=int, default=1, help="AQE_WORKERS of the service")
    p.add_argument("--profile", action="store_true", help="py-spy breakdown under 32 clients")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        data, root = tmpdir / "g.npy", tmpdir / "root"
        generate(data, a.n + 2000, a.d, seed=7)
        x = np.load(data, mmap_mode="r")
        np.save(tmpdir / "gallery.npy", np.asarray(x[: a.n]))
        queries = np.asarray(x[a.n :], dtype=np.float32)
        cmd = [
            sys.executable,
            "-m",
            "index_builder.cli",
            "build",
            "--gallery",
            str(tmpdir / "gallery.npy"),
            "--root",
            str(root),
            "--no-progress",
            "--serving-index",
            a.serving_index,
            "--serving-nprobe",
            str(a.serving_nprobe),
            "--knn",
            a.knn,
        ] + (["--nprobe", str(a.nprobe)] if a.knn != "exact" else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        version = root / "versions" / (root / "current").read_text().strip()
        files_bytes = sum(f.stat().st_size for f in version.iterdir())

        res: dict = {
            "n": a.n,
            "d": a.d,
            "k": a.k,
            "knn": a.knn,
            "nprobe": a.nprobe,
            "serving_index": a.serving_index,
            "serving_nprobe": a.serving_nprobe,
            "workers": a.workers,
            "cpus": os.cpu_count(),
            "load_1min_start": round(os.getloadavg()[0], 2),
        }
        res.update(raw_anchors(root, queries, a.k, a.repeat, a.seconds))

        port = free_port()
        env = {
            **os.environ,
            "AQE_INDEX_ROOT": str(root),
            "AQE_PORT": str(port),
            "AQE_WORKERS": str(a.workers),
            "AQE_LOG_LEVEL": "WARNING",
        }
        server = subprocess.Popen([sys.executable, "-m", "service.main"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/readyz", 120)
            time.sleep(1.0 if a.workers > 1 else 0)  # the other workers load too
            one = run_in_subprocess(url, queries, a.k, 1, a.seconds, tmpdir)
            res["http_p50_ms"], res["http_p99_ms"] = one["p50_ms"], one["p99_ms"]
            floor = run_in_subprocess(url, queries, a.k, 1, a.seconds, tmpdir, path="/healthz")
            res["http_floor_healthz_p50_ms"] = floor["p50_ms"]
            res["concurrency"] = [
                run_in_subprocess(url, queries, a.k, int(c), a.seconds, tmpdir)
                for c in a.concurrency.split(",")
            ]
            res["memory"] = memory(server, files_bytes)
            if a.profile:
                res["profile"] = profile(server, url, queries, a.k, max(a.seconds, 8), tmpdir)
        finally:
            stop(server, 30)
        res["load_1min_end"] = round(os.getloadavg()[0], 2)

    print(json.dumps(res, indent=2))
    raw = res["raw_aqe_p50_ms"]
    print(
        f"\nraw FAISS p50 {res['raw_faiss_p50_ms']:.3f} ms | raw AQE+FAISS p50 {raw:.3f} ms | "
        f"HTTP p50 {res['http_p50_ms']:.3f} ms (+{res['http_p50_ms'] - raw:.3f} ms over raw "
        f"AQE+FAISS; HTTP floor GET /healthz {res['http_floor_healthz_p50_ms']:.3f} ms)"
    )
    print(f"raw AQE+FAISS batch-32: {res['raw_batch32_qps']:.0f} q/s")
    for c in res["concurrency"]:
        print(
            f"HTTP {c['clients']:>3} clients: {c['qps']:>7.0f} q/s "
            f"({c['qps'] / res['raw_batch32_qps']:.2f} of raw batch-32), p50 "
            f"{c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, errors {c['errors']}"
        )
    for m in res["memory"]["processes"]:
        print(
            f"worker {m['pid']}: RSS {m['rss_mib']} MiB, PSS {m['pss_mib']} MiB, USS "
            f"{m['uss_mib']} MiB (version files {res['memory']['index_files_mib']} MiB)"
        )
    if "profile" in res:
        pr = res["profile"]
        print(
            f"profile at 32 clients ({pr['qps_while_sampled']:.0f} q/s): server "
            f"{pr['server_cores']} cores, client {pr['client_cores']} cores; server samples: "
            + ", ".join(f"{g} {v:.0%}" for g, v in pr["shares_of_server_samples"].items())
        )
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
