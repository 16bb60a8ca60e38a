"""Load with swaps: many clients search a real ``search-service`` while new versions are published.

The script builds a small index (or publishes into ``--root``), starts ``search-service`` on a
free loopback port with a short ``AQE_RELOAD_INTERVAL_S`` and an admin token, then for
``--duration`` seconds drives it with ``--clients`` concurrent clients while a publisher thread
publishes a new version every ``--publish-every`` seconds (``index_builder.build.build``) and a
reloader thread calls ``POST /admin/reload`` at random. The run has three windows: *before*
(first ``--quiet-fraction`` of the time, no publishing), *during* and *after* (last
``--quiet-fraction``, no publishing). Every request's start, end, status and index_version is
recorded, and the run fails (exit 1) unless:

- every search and every admin reload succeeded;
- every response names a version that was current while the request ran: the build that
  published it had started before the response ended, and it had not been replaced (the next
  build finished) more than ``reload interval + --grace`` seconds before the request began;
- versions never go backwards: a request that starts after a response naming v ended gets v or
  newer;
- the server releases old versions: after the run it maps files of the current version only,
  and its RSS grew by less than ``--rss-tolerance-mib`` (or two versions' size, if larger).

Latency percentiles (client-side, so they include the client's own queueing) are reported per
window and for requests that started within a swap's pick-up time. All traffic goes to
127.0.0.1; requests are bounded by ``--max-requests`` and time.

Usage::

    python scripts/load_test.py                       # 32 clients, 60 s
    python scripts/load_test.py --clients 8 --duration 8 --rows 2000 --dim 32 --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aqe_retrieval import artifact
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams


@dataclass(frozen=True)
class Record:
    start: float
    end: float
    status: int  # 0: transport error
    version: str | None


@dataclass(frozen=True)
class Publish:
    start: float
    end: float
    version: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="index root to publish into (default: a temp dir)")
    p.add_argument("--gallery", type=Path, help=".npy gallery to build from (default: synthetic)")
    p.add_argument("--rows", type=int, default=10_000, help="synthetic gallery rows")
    p.add_argument("--dim", type=int, default=64, help="synthetic gallery dimension")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument(
        "--quiet-fraction",
        type=float,
        default=0.2,
        help="share of the run before and after the publishing window",
    )
    p.add_argument("--publish-every", type=float, default=4.0, help="seconds between publishes")
    p.add_argument(
        "--reload-every", type=float, default=3.0, help="mean seconds between random POST /admin/reload"
    )
    p.add_argument("--reload-interval", type=float, default=0.5, help="AQE_RELOAD_INTERVAL_S")
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="seconds a replaced version may still answer, beyond the poll interval",
    )
    p.add_argument("--rss-tolerance-mib", type=float, default=32.0)
    p.add_argument("--max-requests", type=int, default=500_000)
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the summary as JSON to this file ('-': stdout)")
    args = p.parse_args(argv)
    if not (args.clients >= 1 and args.duration > 0 and 0 < args.quiet_fraction < 0.5):
        p.error("need --clients >= 1, --duration > 0, 0 < --quiet-fraction < 0.5")
    return args


def synthetic_gallery(directory: Path, n: int, d: int, seed: int) -> dict[str, Path]:
    """Clustered rows (identities of 6 samples), ids and a camera/ts metadata CSV."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 6 + 1, d)).astype(np.float32)
    x = centres[np.arange(n) // 6] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    paths = {
        "gallery": directory / "gallery.npy",
        "ids": directory / "ids.txt",
        "metadata": directory / "meta.csv",
    }
    np.save(paths["gallery"], x.astype(np.float32))
    paths["ids"].write_text("".join(f"item-{i:06d}\n" for i in range(n)))
    paths["metadata"].write_text("camera,ts\n" + "".join(f"{i % 6},{i}\n" for i in range(n)))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int, token: str, reload_interval: float, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "AQE_INDEX_ROOT": str(root),
        "AQE_HOST": "127.0.0.1",
        "AQE_PORT": str(port),
        "AQE_RELOAD_INTERVAL_S": str(reload_interval),
        "AQE_ADMIN_TOKEN": token,
        "AQE_WORKERS": "1",
        "AQE_LOG_LEVEL": "WARNING",
        "AQE_LOCAL_COPY_DIR": str(local_copy_dir(root)),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.main"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"search-service exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"search-service not ready after {timeout:.0f}s")


def request_pool(x: np.ndarray, seed: int, filters: bool, size: int = 256) -> list[bytes]:
    """Pre-serialised search bodies: single queries, batches of 4, some filtered."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(size):
        rows = x[rng.integers(len(x), size=4 if i % 8 == 0 else 1)]
        rows = rows + 0.05 * rng.standard_normal(rows.shape).astype(np.float32)
        body: dict = {"k": int(rng.integers(1, 11))}
        if len(rows) == 1:
            body["embedding"] = rows[0].tolist()
        else:
            body["embeddings"] = rows.tolist()
        if filters and i % 4 == 1:
            body["filter"] = {"camera": {"not_in": [int(rng.integers(6))]}}
        pool.append(json.dumps(body).encode())
    return pool


def local_copy_dir(root: Path) -> Path:
    """Where the service keeps its private copy of the served version (AQE_LOCAL_COPY_DIR)."""
    return root.parent / f"{root.name}-local-copy"


def mapped_versions(pid: int, root: Path) -> set[str]:
    """Versions whose files the server maps, from the root or from its private copy."""
    prefixes = [str(d.resolve() / "versions") + os.sep for d in (root, local_copy_dir(root))]
    return {
        m.path[len(prefix) :].split(os.sep)[0]
        for m in psutil.Process(pid).memory_maps()
        for prefix in prefixes
        if m.path.startswith(prefix)
    }


def percentiles(latencies: list[float]) -> dict[str, float | int | None]:
    if not latencies:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(latencies) * 1000
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


def check_versions(
    records: list[Record], publishes: list[Publish], initial: str, stale_after: float
) -> tuple[list[str], list[str]]:
    """Problems with the 'current during the request' rule, and with monotonicity."""
    started = {initial: -float("inf")} | {p.version: p.start for p in publishes}
    replaced: dict[str, float] = {}
    chain = [initial] + [p.version for p in publishes]
    ends = [p.end for p in publishes]
    for i, v in enumerate(chain[:-1]):
        replaced[v] = ends[i]
    current_rule, monotonic = [], []
    ok = sorted((r for r in records if r.status == 200), key=lambda r: r.end)
    for r in ok:
        v = r.version or ""
        if v not in started:
            current_rule.append(f"unknown version {v!r}")
        elif started[v] > r.end:
            current_rule.append(f"{v} answered at {r.end:.3f}s, before its build began")
        elif replaced.get(v, float("inf")) + stale_after < r.start:
            current_rule.append(
                f"{v} answered a request begun at {r.start:.3f}s, "
                f"{r.start - replaced[v]:.2f}s after it was replaced"
            )
    end_times = [r.end for r in ok]
    newest: list[str] = []
    for r in ok:
        newest.append(max(newest[-1], r.version or "") if newest else (r.version or ""))
    for r in ok:
        i = bisect.bisect_left(end_times, r.start) - 1
        if i >= 0 and (r.version or "") < newest[i]:
            monotonic.append(
                f"request begun at {r.start:.3f}s got {r.version} after {newest[i]} had answered"
            )
    return current_rule, monotonic


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="aqe-load-"))
    root = args.root or work / "root"
    proc: subprocess.Popen | None = None
    try:
        paths = (
            {"gallery": args.gallery}
            if args.gallery
            else synthetic_gallery(work, args.rows, args.dim, args.seed)
        )
        keep = int(args.duration / args.publish_every) + 10

        def publish() -> str:
            return build(
                BuildConfig(
                    gallery=paths["gallery"],
                    ids=paths.get("ids"),
                    metadata=paths.get("metadata"),
                    root=root,
                    params=AqeParams(qe_k=5),
                    keep=keep,
                    threads=1,
                    show_progress=False,
                )
            ).version

        initial = artifact.current_version(root) if root.exists() else None
        initial = initial or publish()
        x = np.load(paths["gallery"], mmap_mode="r")
        pool = request_pool(
            np.asarray(x[: min(len(x), 5000)], dtype=np.float32), args.seed, filters="metadata" in paths
        )
        token, port = secrets.token_hex(16), free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(root, port, token, args.reload_interval, work / "server.log")
        wait_ready(url, proc)
        server = psutil.Process(proc.pid)
        return drive(args, url, token, server, root, pool, publish, initial)
    except RuntimeError as exc:
        log = (work / "server.log").read_text(errors="replace")[-3000:] if proc else ""
        raise SystemExit(f"load_test: {exc}\n{log}") from exc
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def drive(args, url, token, server, root, pool, publish, initial) -> dict:
    quiet = args.duration * args.quiet_fraction
    t0 = time.monotonic()
    end_at, during_from, during_to = t0 + args.duration, t0 + quiet, t0 + args.duration - quiet
    records: list[Record] = []
    publishes: list[Publish] = []
    reloads: list[tuple[float, int, str]] = []
    rss: list[tuple[float, int]] = []
    lock, stop, budget = threading.Lock(), threading.Event(), [args.max_requests]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        with httpx.Client(timeout=args.timeout) as http:
            while time.monotonic() < end_at and not stop.is_set():
                with lock:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
                a = time.monotonic()
                try:
                    r = http.post(
                        f"{url}/search",
                        content=rng.choice(pool),
                        headers={"content-type": "application/json"},
                    )
                    status = r.status_code
                    version = r.json().get("index_version") if status == 200 else None
                except (httpx.HTTPError, ValueError):
                    status, version = 0, None
                mine.append(Record(a - t0, time.monotonic() - t0, status, version))
        with lock:
            records.extend(mine)

    def publisher() -> None:
        last = 0.0
        next_at = during_from
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            if time.monotonic() + last > during_to:
                return
            a = time.monotonic()
            version = publish()
            b = time.monotonic()
            last = b - a
            publishes.append(Publish(a - t0, b - t0, version))
            next_at = a + args.publish_every

    def reloader() -> None:
        rng = random.Random(args.seed + 1)
        with httpx.Client(timeout=30) as http:
            while not stop.wait(rng.uniform(0.2, 2 * args.reload_every)):
                if time.monotonic() < during_from:
                    continue
                if time.monotonic() > during_to:
                    return
                r = http.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}"})
                reloads.append((time.monotonic() - t0, r.status_code, r.json().get("status")))

    def sampler() -> None:
        while not stop.wait(0.25):
            rss.append((time.monotonic() - t0, server.memory_info().rss))

    threads = [threading.Thread(target=client, args=(args.seed * 1000 + i,)) for i in range(args.clients)]
    helpers = [threading.Thread(target=f, daemon=True) for f in (publisher, reloader, sampler)]
    for t in helpers + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in helpers:
        t.join(timeout=120)
    rss.append((time.monotonic() - t0, server.memory_info().rss))
    with httpx.Client(timeout=10) as http:
        info = http.get(f"{url}/info").json()
        metrics = http.get(f"{url}/metrics").text
    return summarise(
        args,
        records,
        publishes,
        reloads,
        rss,
        initial,
        info,
        metrics,
        mapped_versions(server.pid, root),
        root,
    )


def summarise(args, records, publishes, reloads, rss, initial, info, metrics, mapped, root) -> dict:
    quiet = args.duration * args.quiet_fraction
    failed = [r for r in records if r.status != 200]
    stale_after = args.reload_interval + args.grace
    current_rule, monotonic = check_versions(records, publishes, initial, stale_after)
    ok = [r for r in records if r.status == 200]
    swaps = [p.end for p in publishes]
    near = [r for r in ok if any(s <= r.start <= s + args.reload_interval + 1.0 for s in swaps)]
    windows = {
        "before": [r for r in ok if r.start < quiet],
        "during": [r for r in ok if quiet <= r.start < args.duration - quiet],
        "after": [r for r in ok if r.start >= args.duration - quiet],
    }
    latency = {k: percentiles([r.end - r.start for r in v]) for k, v in windows.items()}
    latency["near_swaps"] = percentiles([r.end - r.start for r in near])
    for k, v in windows.items():
        latency[k]["rps"] = round(
            len(v) / quiet if k != "during" else len(v) / (args.duration - 2 * quiet), 1
        )
    rss_before = next((b for t, b in reversed(rss) if t < quiet), rss[0][1])
    rss_after = rss[-1][1]
    version_bytes = sum(f.bytes for f in artifact.read_manifest(root, initial).files.values())
    tolerance = max(args.rss_tolerance_mib * 2**20, 2 * version_bytes)
    served_last = info.get("index_version")
    final = publishes[-1].version if publishes else initial
    failures_metric = _metric(metrics, "aqe_reload_failures_total")
    checks = {
        "no_failed_requests": not failed,
        "admin_reloads_ok": all(status == 200 for _, status, _ in reloads),
        "versions_current_during_request": not current_rule,
        "versions_never_go_back": not monotonic,
        "serves_the_last_published": served_last == final,
        "no_refused_reloads": failures_metric == 0,
        "old_versions_unmapped": mapped <= {final},
        "rss_flat": rss_after - rss_before <= tolerance,
        "swapped_at_least_once": len(publishes) >= 1,
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "failed_statuses": sorted({r.status for r in failed}),
        "publishes": len(publishes),
        "admin_reloads": len(reloads),
        "reloads_loaded": _metric(metrics, "aqe_reloads_total"),
        "versions_served": len({r.version for r in ok}),
        "served_last": served_last,
        "latency": latency,
        "rss_mib": {
            "before": round(rss_before / 2**20, 1),
            "after": round(rss_after / 2**20, 1),
            "max": round(max(b for _, b in rss) / 2**20, 1),
            "growth": round((rss_after - rss_before) / 2**20, 1),
            "tolerance": round(tolerance / 2**20, 1),
            "version_size": round(version_bytes / 2**20, 2),
        },
        "rss_series_mib": [[round(t, 1), round(b / 2**20, 1)] for t, b in rss[::8]],
        "mapped_versions_after": sorted(mapped),
        "violations": {"current_rule": current_rule[:10], "monotonic": monotonic[:10]},
        "checks": checks,
        "passed": all(checks.values()),
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def table(s: dict) -> str:
    lines = [
        f"requests {s['requests']}  ok {s['ok']}  failed {s['failed']}  "
        f"publishes {s['publishes']}  admin reloads {s['admin_reloads']}  "
        f"versions served {s['versions_served']}",
        f"{'window':<12}{'n':>8}{'req/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for name, w in s["latency"].items():
        lines.append(
            f"{name:<12}{w['n']:>8}{w.get('rps', ''):>8}{w['p50_ms'] or '-':>9}"
            f"{w['p90_ms'] or '-':>9}{w['p99_ms'] or '-':>9}{w['max_ms'] or '-':>9}"
        )
    m = s["rss_mib"]
    lines.append(
        f"server RSS MiB: before {m['before']}  after {m['after']}  max {m['max']}  "
        f"growth {m['growth']} (tolerance {m['tolerance']}, one version "
        f"{m['version_size']})  mapped after: {len(s['mapped_versions_after'])} version"
    )
    lines += [f"  [{'ok' if v else 'FAIL'}] {k}" for k, v in s["checks"].items()]
    for kind, problems in s["violations"].items():
        lines += [f"  {kind}: {p}" for p in problems]
    lines.append("PASSED" if s["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(table(summary), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(summary, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
