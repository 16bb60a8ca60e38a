"""With several workers, every worker's own log lines reach the process's output, each with its pid."""

from __future__ import annotations

import re
import time

import httpx
import psutil
import pytest
from helpers import service_process


def test_every_workers_service_lines_reach_the_output(built_root, tmp_path):
    env = {
        "AQE_INDEX_ROOT": str(built_root),
        "AQE_WORKERS": "2",
        "AQE_RELOAD_INTERVAL_S": "0",
        "AQE_ADMIN_TOKEN": "secret",
    }
    path = tmp_path / "server.log"
    loaded = re.compile(r"\[(\d+)\] service\.index_manager: serving version \S+ \(loaded in \S+ was None\)")
    reloaded = re.compile(
        r"\[(\d+)\] service\.index_manager: serving version \S+ \(loaded in \S+ was (?!None)"
    )

    def pids(pattern: re.Pattern) -> set[int]:
        return {int(p) for p in pattern.findall(path.read_text(errors="replace"))}

    with service_process(path, env=env, workers=2, timeout_s=60) as (url, proc):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pids(loaded)) < 2:
            time.sleep(0.1)
        workers = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert len(pids(loaded)) == 2 and pids(loaded) <= workers, path.read_text()
        # a reload asked of one worker reaches the other: both say so in the output
        r = httpx.post(f"{url}/admin/reload", headers={"Authorization": "Bearer secret"})
        assert r.status_code == 200, r.text
        while time.monotonic() < deadline and len(pids(reloaded)) < 2:
            time.sleep(0.1)
        assert pids(reloaded) == pids(loaded), path.read_text()
    if proc.returncode not in (0, -15):
        pytest.fail(f"search-service exited {proc.returncode}:\n{path.read_text()}")
