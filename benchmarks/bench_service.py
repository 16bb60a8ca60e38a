"""The search service over HTTP against raw in-process FAISS on the same index, in one run.

Builds an index from structured synthetic data, then measures:
  * raw in-process: the serving index's ``search`` for one query (no expansion), the same with
    online query expansion (``Searcher.search``), and batch-32 throughput;
  * HTTP (``search-service`` in its own process, keep-alive clients on loopback): single-query
    latency p50/p99, and throughput with 1 .. 64 concurrent clients.
Client and server share this machine's cores, so the HTTP figures include the clients' own cost.

    python benchmarks/bench_service.py --n 100000 --d 256
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import generate  # noqa: E402


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.array(samples) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def timed(fn, queries: np.ndarray, repeat: int) -> list[float]:
    out = []
    for i in range(repeat):
        q = queries[i % len(queries)][None]
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return out


def http_clients(url: str, queries: list[list[float]], clients: int, seconds: float, k: int):
    """Closed-loop clients for ``seconds``; returns (requests/s, errors, p50 ms, p99 ms)."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def run(seed: int) -> None:
        mine, bad = [], 0
        with httpx.Client(base_url=url, timeout=30) as c:
            i = seed
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = c.post("/search", json={"embedding": queries[i % len(queries)], "k": k})
                mine.append(time.perf_counter() - t0)
                bad += r.status_code != 200
                i += clients
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=run, args=(s,)) for s in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p50, p99 = percentiles(lat)
    return len(lat) / (time.perf_counter() - t0), errors[0], p50, p99


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--serving-index", default="exact")
    p.add_argument("--serving-nprobe", type=int)
    p.add_argument("--knn", default="exact")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--repeat", type=int, default=500)
    p.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    from index_builder import artifact
    from service.searcher import Searcher

    with tempfile.TemporaryDirectory() as tmp:
        data, root = Path(tmp) / "g.npy", Path(tmp) / "root"
        generate(data, a.n + 1000, a.d, seed=7)
        x = np.load(data, mmap_mode="r")
        np.save(Path(tmp) / "gallery.npy", np.asarray(x[: a.n]))
        queries = np.asarray(x[a.n :], dtype=np.float32)
        cmd = [sys.executable, "-m", "index_builder.cli", "build", "--gallery",
               str(Path(tmp) / "gallery.npy"), "--root", str(root), "--no-progress",
               "--serving-index", a.serving_index, "--knn", a.knn]
        cmd += ["--serving-nprobe", str(a.serving_nprobe)] if a.serving_nprobe else []
        cmd += ["--nprobe", str(a.nprobe)] if a.nprobe else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

        import faiss

        faiss.omp_set_num_threads(1)
        s = Searcher(artifact.load(root))
        s.warm_up()
        index = s.artifact.serving_index
        from index_builder.aqe import normalize_rows

        res: dict = {"n": a.n, "d": a.d, "k": a.k, "serving_index": a.serving_index}
        res["raw_faiss_p50_ms"], res["raw_faiss_p99_ms"] = percentiles(
            timed(lambda q: index.search(normalize_rows(q)[0], a.k), queries, a.repeat))
        res["raw_aqe_p50_ms"], res["raw_aqe_p99_ms"] = percentiles(
            timed(lambda q: s.search(q, a.k), queries, a.repeat))
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            s.search(queries[done % 960 : done % 960 + 32], a.k)
            done += 32
        res["raw_aqe_batch32_qps"] = done / (time.perf_counter() - t0)
        faiss.omp_set_num_threads(os.cpu_count() or 1)

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "AQE_INDEX_ROOT": str(root), "AQE_PORT": str(port),
               "AQE_WORKERS": str(a.workers), "AQE_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen([sys.executable, "-m", "service.main"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            qlist = queries.tolist()
            with httpx.Client(base_url=url) as c:
                lat = []
                for i in range(a.repeat):
                    t0 = time.perf_counter()
                    r = c.post("/search", json={"embedding": qlist[i % len(qlist)], "k": a.k})
                    lat.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
            res["http_p50_ms"], res["http_p99_ms"] = percentiles(lat)
            res["concurrency"] = []
            for cl in (int(c) for c in a.concurrency.split(",")):
                qps, errors, p50, p99 = http_clients(url, qlist, cl, a.seconds, a.k)
                res["concurrency"].append({"clients": cl, "qps": qps, "errors": errors,
                                           "p50_ms": p50, "p99_ms": p99})
        finally:
            server.terminate()
            server.wait(timeout=15)

    print(json.dumps(res, indent=2))
    print(f"\nraw FAISS p50 {res['raw_faiss_p50_ms']:.2f} ms | raw AQE+FAISS p50 "
          f"{res['raw_aqe_p50_ms']:.2f} ms | HTTP p50 {res['http_p50_ms']:.2f} ms "
          f"(+{res['http_p50_ms'] - res['raw_aqe_p50_ms']:.2f} ms over raw AQE)")
    print(f"raw AQE batch-32: {res['raw_aqe_batch32_qps']:.0f} q/s")
    for c in res["concurrency"]:
        print(f"HTTP {c['clients']:>3} clients: {c['qps']:>7.0f} q/s "
              f"({c['qps'] / res['raw_aqe_batch32_qps']:.2f} of raw batch-32), p50 "
              f"{c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, errors {c['errors']}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
