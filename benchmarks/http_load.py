"""A lean HTTP/1.1 load client for the service benchmarks: asyncio, keep-alive, pre-encoded requests.

A general client (httpx, requests) spends about as long building and parsing a request in Python
as the service spends answering it, and on this 2-core machine it runs on the same cores; the
figures would mostly measure the client. This one writes request bytes prepared before the clock
starts and reads each response by its ``content-length``, so its own cost per request is a few
tens of microseconds. Every response's status is checked (anything but 200 is an error); the
bodies of the first responses are parsed and checked to hold ``k`` hits per query.

Run it in a process of its own (``python benchmarks/http_load.py URL BODIES.npy ...`` or
:func:`run_in_subprocess`) so the client and the benchmark driver do not share one GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def request_bytes(
    host: str, port: int, body: bytes, path: str = "/search", content_type: str = "application/json"
) -> bytes:
    """``POST path`` with ``body`` (JSON by default); ``GET path`` when ``body`` is empty."""
    if not body:
        return f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\n\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def json_bodies(queries: np.ndarray, k: int) -> list[bytes]:
    """One ``{"embedding": [...], "k": k}`` body per query row."""
    return [json.dumps({"embedding": q.tolist(), "k": k}).encode() for q in queries]


def chroma_bodies(queries: np.ndarray, k: int) -> list[bytes]:
    """One Chroma ``/query`` body per query row (benchmarks/bench_vs_chroma.py)."""
    return [
        json.dumps({"query_embeddings": [q.tolist()], "n_results": k, "include": ["distances"]}).encode()
        for q in queries
    ]


def float32_bodies(queries: np.ndarray) -> list[bytes]:
    """One little-endian float32 body per query row (``application/octet-stream``)."""
    return [np.asarray(q, dtype="<f4").tobytes() for q in queries]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _load(url: str, requests: list[bytes], clients: int, seconds: float, k: int, check: int) -> dict:
    parts = urlsplit(url)
    lat: list[float] = []
    errors = [0]
    checked = [0]
    stop = [0.0]

    async def one_client(seed: int) -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        i = seed
        try:
            while time.perf_counter() < stop[0]:
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status, body = await _read_response(reader)
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    errors[0] += 1
                elif checked[0] < check:
                    checked[0] += 1
                    answer = json.loads(body)
                    results = answer["results"] if "results" in answer else answer["ids"]  # Chroma's
                    if len(results) != 1 or len(results[0]) != k:
                        errors[0] += 1
                i += clients
        finally:
            writer.close()

    stop[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {
        "clients": clients,
        "requests": len(lat),
        "seconds": round(elapsed, 2),
        "qps": round(len(lat) / elapsed, 1),
        "errors": errors[0],
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
    }


def load(
    url: str,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    k: int,
    path: str = "/search",
    content_type: str = "application/json",
) -> dict:
    """Closed-loop load: ``clients`` connections, each sending the next body as soon as answered.

    With ``path`` other than ``/search...`` the client sends ``GET path`` and checks statuses only.
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    if path in ("/healthz", "/readyz"):
        bodies = [b""]
    requests = [request_bytes(parts.hostname, parts.port, b, path, content_type) for b in bodies]
    return _run(_load(url, requests, clients, seconds, k, 0 if not bodies[0] else 20))


def _run(main: Coroutine[Any, Any, dict]) -> dict:
    """``main`` on uvloop where it is installed (the service's own loop): the client's cost per
    request is then about half of asyncio's, CPU the server it measures shares the cores with."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_in_subprocess(
    url: str,
    queries: np.ndarray,
    k: int,
    clients: int,
    seconds: float,
    workdir: Path,
    path: str = "/search",
    encoding: str = "json",
) -> dict:
    """:func:`load` in a child process (its own GIL); returns its figures."""
    saved = workdir / "http_load_queries.npy"
    np.save(saved, np.asarray(queries, dtype=np.float32))
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            url,
            str(saved),
            "--k",
            str(k),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--path",
            path,
            "--encoding",
            encoding,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("queries", type=Path, help=".npy of (q, d) float32 query embeddings")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--path", default="/search", help="other paths: GET, status checked only")
    p.add_argument(
        "--encoding",
        choices=["json", "float32", "chroma"],
        default="json",
        help="float32: application/octet-stream bodies, k in the query string; chroma: Chroma's "
        "query bodies, to --path (its collection's /query route)",
    )
    a = p.parse_args()
    queries = np.load(a.queries)
    if a.encoding == "float32":
        path = f"{a.path}?k={a.k}" if a.path == "/search" else a.path
        binary = "application/octet-stream"
        figures = load(a.url, float32_bodies(queries), a.clients, a.seconds, a.k, path, binary)
    elif a.encoding == "chroma":
        figures = load(a.url, chroma_bodies(queries, a.k), a.clients, a.seconds, a.k, a.path)
    else:
        figures = load(a.url, json_bodies(queries, a.k), a.clients, a.seconds, a.k, a.path)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
