"""A lean HTTP/1.1 load client for the service benchmarks: asyncio, keep-alive, pre-encoded requests.

A general client (httpx, requests) spends about as long building and parsing a request in Python
as the service spends answering it, and on this 2-core machine it runs on the same cores; the
figures would mostly measure the client. This one writes request bytes prepared before the clock
starts and reads each response by its ``content-length``, so its own cost per request is a few
tens of microseconds. Every response's status is checked (anything but 200 is an error); the
bodies of the first responses are parsed and checked to hold ``k`` hits per query.

Run it in a process of its own (``python benchmarks/http_load.py URL BODIES.npy ...`` or
:func:`run_in_subprocess`) so the client and the benchmark driver do not share one GIL.

Where ``wrk`` is installed (Debian: ``apt-get install wrk``) it drives the load instead (the
``client`` choice ``auto``; ``wrk`` or ``python`` to choose): the same pre-encoded bodies in turn
(``wrk_bodies.lua``), one epoll thread in C. Measured here at 32 connections against the service
(Bible set, 2 workers): the Python client used 0.26 of a core and wrk 0.09, and the service
answered 4-8 % more with wrk driving it. wrk counts every status but 2xx/3xx as an error; the
bodies of the first responses are checked (``k`` hits a query) before it starts. Every result
names its ``client``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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
                    try:
                        _check_hits(json.loads(body), k)
                    except (ValueError, KeyError):
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


CLIENTS = ("auto", "wrk", "python")
CHECKED = 20
"""Responses whose bodies are parsed and checked (``k`` hits) before or during a run."""


def load(
    url: str,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    k: int,
    path: str = "/search",
    content_type: str = "application/json",
    client: str = "auto",
) -> dict:
    """Closed-loop load: ``clients`` connections, each sending the next body as soon as answered.

    With ``path`` other than ``/search...`` the client sends ``GET path`` and checks statuses only.
    ``client``: ``wrk`` (:func:`load_wrk`), ``python`` (this module's asyncio client) or ``auto``
    (wrk where it is on the PATH and the requests are POSTs).
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    if path in ("/healthz", "/readyz"):
        bodies = [b""]
    if client == "auto":
        client = "wrk" if shutil.which("wrk") and bodies[0] else "python"
    if client == "wrk":
        return load_wrk(url, bodies, clients, seconds, k, path, content_type)
    requests = [request_bytes(parts.hostname, parts.port, b, path, content_type) for b in bodies]
    figures = _run(_load(url, requests, clients, seconds, k, 0 if not bodies[0] else CHECKED))
    return {**figures, "client": "python"}


def load_wrk(
    url: str,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    k: int,
    path: str = "/search",
    content_type: str = "application/json",
) -> dict:
    """:func:`load` driven by ``wrk`` (one thread): the same figures, with ``client`` ``"wrk"``.

    The first bodies' answers are checked first (:func:`check_answers`); wrk's duration is whole
    seconds (``seconds`` rounded, at least 1).
    """
    if not bodies or not bodies[0]:
        raise ValueError("wrk drives POST requests with bodies only")
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    base = url.rstrip("/")
    check_answers(base + path, bodies[:CHECKED], content_type, k)
    duration = max(1, round(seconds))
    with tempfile.TemporaryDirectory(prefix="http-load-") as tmp:
        records = Path(tmp) / "bodies"
        records.write_bytes(b"".join(b"%d\n%s" % (len(b), b) for b in bodies))
        script = Path(__file__).with_name("wrk_bodies.lua")
        cmd = [binary, "-t1", f"-c{clients}", f"-d{duration}s", "--timeout", "10s", "-s", str(script)]
        out = subprocess.run(
            [*cmd, base + path, "--", str(records), content_type, path],
            check=True,
            capture_output=True,
            text=True,
        )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    elapsed = figures["duration_us"] / 1e6
    return {
        "clients": clients,
        "requests": figures["requests"],
        "seconds": round(elapsed, 2),
        "qps": round(figures["requests"] / elapsed, 1),
        "errors": figures["errors"],
        "p50_ms": round(figures["p50_us"] / 1000, 3),
        "p99_ms": round(figures["p99_us"] / 1000, 3),
        "client": "wrk",
    }


def check_answers(url: str, bodies: list[bytes], content_type: str, k: int) -> None:
    """POST each body once; raise unless every answer is a 200 with one query of ``k`` hits."""
    for body in bodies:
        req = urllib.request.Request(url, data=body, headers={"content-type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                _check_hits(json.loads(response.read()), k)
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{url} answered {exc.code}: {exc.read()[:300]!r}") from None


def _check_hits(answer: dict, k: int) -> None:
    results = answer["results"] if "results" in answer else answer["ids"]  # Chroma's
    if len(results) != 1 or len(results[0]) != k:
        raise ValueError(f"expected one query of {k} hits, got {[len(r) for r in results]}")


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
    client: str = "auto",
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
            "--client",
            client,
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
    p.add_argument("--client", choices=CLIENTS, default="auto", help="auto: wrk where installed")
    a = p.parse_args()
    queries = np.load(a.queries)
    path, content_type = a.path, "application/json"
    if a.encoding == "float32":
        path = f"{a.path}?k={a.k}" if a.path == "/search" else a.path
        bodies, content_type = float32_bodies(queries), "application/octet-stream"
    elif a.encoding == "chroma":
        bodies = chroma_bodies(queries, a.k)
    else:
        bodies = json_bodies(queries, a.k)
    figures = load(a.url, bodies, a.clients, a.seconds, a.k, path, content_type, a.client)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
