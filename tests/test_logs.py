"""Entry points start without faiss's loader chatter (AVX-512/AVX2 module attempts)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from helpers import free_port


def test_search_service_starts_without_faiss_loader_lines(tmp_path):
    port = free_port()
    env = {**os.environ, "AQE_INDEX_ROOT": str(tmp_path), "AQE_PORT": str(port), "AQE_RELOAD_INTERVAL_S": "0"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.main"], env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise AssertionError("search-service did not start:\n" + log.read_text())
        finally:
            proc.terminate()
            proc.wait(10)
    text = log.read_text()
    assert "Application startup complete" in text  # INFO lines still come through
    assert "faiss.loader" not in text and "AVX" not in text, text


def test_index_builder_prints_no_faiss_loader_lines(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "index_builder.cli", "-v", "list", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "faiss.loader" not in proc.stdout + proc.stderr
