"""Test data helpers shared by the test modules: seeded rows shaped like re-ID embeddings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

STARTED = "Application startup complete."
"""What each worker process of ``search-service`` logs once its start-up (the first load) is done."""


def random_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Isotropic Gaussian rows (no structure, no ties)."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered_data(n: int, d: int, seed: int = 0, per_id: int = 6, dup_every: int = 17) -> np.ndarray:
    """Identities with a few noisy samples each, varied norms, and exact duplicate rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per_id + 1, d)).astype(np.float32)
    x = centres[np.arange(n) // per_id] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    x *= rng.uniform(0.5, 3.0, size=(n, 1)).astype(np.float32)
    x[dup_every::dup_every] = x[dup_every - 1 : -1 : dup_every][: len(x[dup_every::dup_every])]
    return x.astype(np.float32)


def write_gallery(
    directory: Path, x: np.ndarray, with_ids: bool = True, with_metadata: bool = True
) -> dict[str, Path]:
    """Write a gallery (.npy), ids and a metadata CSV (camera = row % 6, ts = row)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"gallery": directory / "gallery.npy"}
    np.save(paths["gallery"], x)
    if with_ids:
        paths["ids"] = directory / "ids.txt"
        paths["ids"].write_text("".join(f"img-{i:05d}\n" for i in range(len(x))))
    if with_metadata:
        paths["metadata"] = directory / "meta.csv"
        paths["metadata"].write_text(
            "camera,ts,label\n" + "".join(f"{i % 6},{i},p{i // 6}\n" for i in range(len(x)))
        )
    return paths


def search_until(client: Any, x: np.ndarray, stop: Any, seed: int, k: int) -> list[int]:
    """Status codes of ``POST /search`` with random rows of ``x`` until ``stop`` is set (a load thread)."""
    r = np.random.default_rng(seed)
    codes = []
    while not stop.is_set():
        codes.append(
            client.post("/search", json={"embedding": x[r.integers(len(x))].tolist(), "k": k}).status_code
        )
    return codes


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def started(log: Path) -> int:
    """How many worker processes have finished their start-up (the lifespan, so the first load)."""
    return log.read_text(errors="replace").count(STARTED)


def wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    workers: int = 1,
    path: str = "/readyz",
    timeout_s: float = 30.0,
) -> None:
    """Until ``url + path`` answers 200 and ``workers`` workers have started (their log lines).

    Fails the test, with the end of ``log``, if the process exits first or the time runs out.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("search-service exited:\n" + _tail(log))
        try:
            if httpx.get(url + path, timeout=1).status_code == 200 and started(log) >= workers:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail("search-service did not become ready:\n" + _tail(log))


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


@contextmanager
def serving(
    log: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    workers: int = 1,
    port: int | None = None,
    ready_path: str = "/readyz",
    timeout_s: float = 30.0,
) -> Iterator[str]:
    """A real ``search-service ARGS`` process with ``env``, once ready (:func:`wait_ready`); its URL.

    It listens on ``port`` (given as a flag in ``args``), else on a free port it is told through
    ``AQE_PORT``; ``AQE_RELOAD_INTERVAL_S`` is 0.2 unless ``env`` says otherwise. Its output goes
    to ``log``. The test fails if the process has exited by the end of the block; it is then
    terminated (killed after 15 s).
    """
    with service_process(log, args, env, workers, port, ready_path, timeout_s) as (url, _):
        yield url


@contextmanager
def service_process(
    log: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    workers: int = 1,
    port: int | None = None,
    ready_path: str = "/readyz",
    timeout_s: float = 30.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`serving`, yielding the process too (its ``returncode`` is set once the block ends)."""
    if port is None:
        port = free_port()
        env = {"AQE_PORT": str(port), **(env or {})}
    full_env = {**os.environ, "AQE_RELOAD_INTERVAL_S": "0.2", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.main", *args], env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(url, proc, log, workers, ready_path, timeout_s)
            yield url, proc
            if proc.poll() is not None:
                pytest.fail("search-service exited during the test:\n" + _tail(log))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
