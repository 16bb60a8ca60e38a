"""Where a ``POST /search`` request's CPU goes: the HTTP stack's floor, the app, the search.

Over HTTP, on this machine's loopback, driven by the same load client (http_load.py: ``wrk``
where it is installed) with the same JSON bodies at ``--clients`` connections, interleaved over
``--rounds``:

  * **floor**: a trivial ASGI app that reads the body and answers a fixed 10-hit JSON, served by
    the service's own uvicorn config, protocol (``service.protocol``) and ``SO_REUSEPORT``
    supervisor (``service.supervisor``) with ``--workers`` processes: what uvicorn, the
    kernel's loopback and the load client cost a request;
  * **service**: ``search-service`` on ``--root`` with ``--workers`` processes;

and, before each round, the raw anchor of bench_vs_chroma.py (``Searcher.search`` at batch 32,
the better of a thread per core and one thread with FAISS on every core:
``bench_service.raw_batch32_qps``) that the service's q/s is read against. Each is also given as CPU a
request (the machine's cores divided by the q/s: servers and client share the cores), split
into the server processes' user and kernel time and the load client's (``wrk`` and the Python
process that runs it, its start-up and answer checks included: a fixed cost spread over the
requests), each read before and after the load. In process, one thread:

  * **app**: ``POST /search`` through the service's ASGI app (``service.app``) with the search
    answered from a cache (the same hits every time), ``--concurrency`` requests at a time (one
    event loop turn, on-loop batching): what the app adds to a request, without the metrics'
    multiprocess files;
  * **search**: ``Searcher.search`` (the queries' checks, then ``search_checked``) a query at
    batch 1, 5 and 32 (FAISS with one thread, as the service runs it).

    python benchmarks/http_floor.py --root var/vb/features_root_auto \\
        --queries var/vb/features_queries.npy --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_service import raw_batch32_qps  # noqa: E402
from http_load import run_in_subprocess  # noqa: E402
from servers import free_port, stop, wait_http  # noqa: E402

FLOOR_BODY = json.dumps(
    {"index_version": "floor", "results": [[{"id": str(i), "score": 0.5} for i in range(10)]]}
).encode()


async def floor_app(scope: dict, receive: Any, send: Any) -> None:
    """Read the request's body, answer a fixed 10-hit JSON (``/readyz`` too)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(FLOOR_BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FLOOR_BODY})


def serve_floor(port: int, workers: int) -> None:
    """:func:`floor_app` as ``search-service`` serves: its config, protocol and sockets."""
    from service.main import _Config
    from service.supervisor import BalancedMultiprocess, listening_sockets

    config = _Config(
        "http_floor:floor_app",
        workers=workers,
        access_log=False,
        log_level="warning",
        lifespan="off",
        http="service.protocol:GuardedHttpToolsProtocol",
    )
    BalancedMultiprocess(config, listening_sockets("127.0.0.1", port, workers)).run()


def start(cmd: list[str], env: dict[str, str], log: Path, url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(url + "/readyz", seconds=120)
    except BaseException:
        stop(proc)
        raise
    return proc


def cpu_seconds(proc: subprocess.Popen) -> tuple[float, float]:
    """User and system CPU seconds of ``proc``'s process tree so far (its workers included)."""
    import psutil

    root = psutil.Process(proc.pid)
    user = system = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        user, system = user + times.user, system + times.system
    return user, system


def client_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (the load client and ``wrk``)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def app_cost(root: Path, queries: np.ndarray, k: int, concurrency: int, requests: int) -> float:
    """Microseconds a ``POST /search`` costs in process through the app, its search cached."""
    import uvloop

    from service.app import create_app
    from service.index_manager import IndexManager
    from service.settings import Settings

    settings = Settings(index_root=root, search_on_loop="on")  # type: ignore[call-arg]
    app = create_app(settings, IndexManager.from_settings(settings))
    bodies = [json.dumps({"embedding": q.tolist(), "k": k}).encode() for q in queries[:200]]

    async def one(body: bytes, out: list) -> None:
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/search",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        }
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            out.append(message)

        await app(scope, receive, send)

    async def run() -> float:
        async with app.router.lifespan_context(app):
            searcher = app.state.manager.searcher
            real, cached = searcher.search_checked, {}

            def search_checked(q: np.ndarray, k: int, *args: Any, **kwargs: Any) -> list:
                if k not in cached:
                    cached[k] = real(q[:1], k, *args, **kwargs)[0]
                return [cached[k]] * len(q)

            searcher.search_checked = search_checked
            out: list = []
            for body in bodies[:50]:
                await one(body, out)
            if out[0]["status"] != 200:
                raise SystemExit(f"the app answered {out[0]['status']}: {out[1].get('body', b'')[:200]!r}")
            t0 = time.perf_counter()
            for i in range(0, requests, concurrency):
                await asyncio.gather(*(one(bodies[(i + j) % len(bodies)], []) for j in range(concurrency)))
            return (time.perf_counter() - t0) / requests * 1e6

    return uvloop.run(run())


def searcher_of(root: Path) -> Any:
    """The served version of ``root``, warmed up, FAISS at one thread (as the service searches)."""
    import faiss

    from aqe_retrieval import artifact
    from aqe_retrieval.searcher import Searcher

    searcher = Searcher(artifact.load(root))
    searcher.warm_up()
    faiss.omp_set_num_threads(1)
    return searcher


def search_cost(searcher: Any, queries: np.ndarray, k: int, batch: int, repeat: int = 3) -> float:
    """Microseconds a query of ``Searcher.search`` at ``batch`` (best of ``repeat``)."""
    rows = len(queries) // batch * batch
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for lo in range(0, rows, batch):
            searcher.search(queries[lo : lo + batch], k)
        best = min(best, (time.perf_counter() - t0) / rows * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="an index root (index-builder build)")
    p.add_argument("--queries", type=Path, help=".npy of (q, d) queries")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="in-process requests at a time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    p.add_argument("--json", type=Path)
    p.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_floor:
        serve_floor(a.serve_floor, a.workers)
        return
    if a.root is None or a.queries is None:
        p.error("--root and --queries are required")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    queries = np.load(a.queries)
    cores = os.cpu_count() or 1
    res: dict = {"cores": cores, "workers": a.workers, "clients": a.clients, "rounds": []}
    res["load_start"] = [round(v, 2) for v in os.getloadavg()]
    servers = {
        "floor": ([sys.executable, __file__, "--serve-floor", "{port}", "--workers", str(a.workers)], {}),
        "service": (
            ["search-service"],
            {"AQE_INDEX_ROOT": str(a.root), "AQE_WORKERS": str(a.workers), "AQE_PORT": "{port}"},
        ),
    }
    searcher = searcher_of(a.root)
    for _ in range(a.rounds):
        row: dict = {"raw_batch32_qps": raw_batch32_qps(searcher, queries, a.k, a.seconds)}
        for name, (cmd, env) in servers.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start(
                [c.format(port=port) for c in cmd],
                {key: value.format(port=port) for key, value in env.items()},
                a.workdir / f"http_floor_{name}.log",
                url,
            )
            try:
                user, system, client = *cpu_seconds(proc), client_cpu()
                got = run_in_subprocess(url, queries, a.k, a.clients, a.seconds, a.workdir)
                user2, system2 = cpu_seconds(proc)
                client = client_cpu() - client
            finally:
                stop(proc)
            served = got["qps"] * got["seconds"]
            row[name] = {
                "qps": got["qps"],
                "p50_ms": got["p50_ms"],
                "client": got["client"],
                # per request: the server's processes (user, kernel) and the load client's, in us
                "server_user_us": round((user2 - user) / served * 1e6, 1),
                "server_system_us": round((system2 - system) / served * 1e6, 1),
                "client_us": round(client / served * 1e6, 1),
            }
        res["rounds"].append(row)
    for name in servers:
        qps = median(r[name]["qps"] for r in res["rounds"])
        res[name] = {"qps": qps, "cpu_us_per_request": round(cores / qps * 1e6, 1)}
        for part in ("server_user_us", "server_system_us", "client_us"):
            res[name][part] = median(r[name][part] for r in res["rounds"])
    res["raw_batch32_qps"] = median(r["raw_batch32_qps"] for r in res["rounds"])
    ratios = [r["service"]["qps"] / r["raw_batch32_qps"] for r in res["rounds"]]
    res["service_of_raw"] = round(median(ratios), 3)
    res["app_us_per_request"] = round(app_cost(a.root, queries, a.k, a.concurrency, 4000), 1)
    res["search_us_per_query"] = {
        b: round(search_cost(searcher, queries, a.k, b), 1) for b in (1, 5, 32) if b <= len(queries)
    }
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print(f"{cores} cores, {a.workers} workers, {a.clients} connections, medians of {a.rounds} rounds")
    for name in servers:
        got = res[name]
        rounds = ", ".join(f"{r[name]['qps']:.0f}" for r in res["rounds"])
        print(
            f"  {name:8s} {got['qps']:7.0f} q/s ({rounds}): {got['cpu_us_per_request']:.0f} us a request; "
            f"server user {got['server_user_us']:.0f} + kernel {got['server_system_us']:.0f} us, "
            f"load client {got['client_us']:.0f} us (start-up included)"
        )
    raw = res["raw_batch32_qps"]
    anchor = "Searcher.search, batch 32"
    print(f"  raw      {raw:7.0f} q/s ({anchor}): {cores / raw * 1e6:.0f} us a query")
    print(f"  service / raw: {res['service_of_raw']:.2f} (median of the rounds' own ratios)")
    app = res["app_us_per_request"]
    print(f"  app in process, search cached, {a.concurrency} at a time: {app:.0f} us a request")
    print(
        "  Searcher.search in process, one thread: "
        + ", ".join(f"batch {b} {us:.0f} us" for b, us in res["search_us_per_query"].items())
        + " a query"
    )
    print(f"load average: start {res['load_start']}, end {res['load_end']}")


if __name__ == "__main__":
    main()
