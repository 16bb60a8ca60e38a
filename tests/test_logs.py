"""Entry points start without faiss's loader chatter (AVX-512/AVX2 module attempts)."""

from __future__ import annotations

import subprocess
import sys

from helpers import serving


def test_search_service_starts_without_faiss_loader_lines(tmp_path):
    env = {"AQE_INDEX_ROOT": str(tmp_path), "AQE_RELOAD_INTERVAL_S": "0"}
    log = tmp_path / "server.log"
    with serving(log, env=env, ready_path="/healthz"):  # no version to load: alive, not ready
        pass
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
