"""A real ``search-service`` process on a loopback port: CLI, workers, load shedding, slow clients.

Every request loop here is bounded in count and in time; everything talks to 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from index_builder.cli import main as builder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_gallery) -> Path:
    """An index root with one version of ``small_gallery`` (600 x 32, ids and metadata)."""
    _, paths = small_gallery
    root = tmp_path_factory.mktemp("served")
    args = ["build", "--root", str(root), "--qe-k", "5", "--no-progress"]
    for name in ("gallery", "ids", "metadata"):
        args += [f"--{name}", str(paths[name])]
    assert builder(args) == 0
    return root


@contextmanager
def serving(
    log: Path,
    args: tuple[str, ...] | list[str] = (),
    env: dict[str, str] | None = None,
    workers: int = 1,
    port: int | None = None,
) -> Iterator[str]:
    """``search-service ARGS`` with ``env`` until every worker is ready; yields its base URL.

    The server listens on ``port`` (given as a flag in ``args``), else on a free port it is
    told through ``AQE_PORT``.
    """
    if port is None:
        port = free_port()
        env = {"AQE_PORT": str(port), **(env or {})}
    full_env = {**os.environ, "AQE_RELOAD_INTERVAL_S": "0.2", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.main", *args], env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200 and (
                        log.read_text(errors="replace").count("Application startup complete.") >= workers
                    ):
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, "search-service exited:\n" + log.read_text()
                time.sleep(0.1)
            else:
                pytest.fail("search-service did not become ready:\n" + log.read_text())
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_help_prints_usage_without_any_configuration():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "service.main", "--help"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: search-service" in proc.stdout
    for flag in ("--index-root", "--host", "--port", "--workers"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "--port"),
        (["--workers", "0"], "--workers"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_a_bad_flag_exits_2_and_names_it(tmp_path, args, says):
    proc = subprocess.run(
        [sys.executable, "-m", "service.main", "--index-root", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_flags_win_over_the_environment_in_every_worker(tmp_path, root):
    port = free_port()
    # the environment names a missing root and another port: the flags must win in both workers
    env = {"AQE_INDEX_ROOT": str(tmp_path / "missing"), "AQE_PORT": "1"}
    args = ["--index-root", str(root), "--port", str(port), "--workers", "2", "--host", "127.0.0.1"]
    with serving(tmp_path / "log", args, env, workers=2, port=port) as url:
        for _ in range(10):  # fresh connections, so both workers answer some
            with httpx.Client(base_url=url) as c:
                assert c.get("/readyz").json()["status"] == "ready"
