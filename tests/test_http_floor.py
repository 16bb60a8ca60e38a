"""benchmarks/http_floor.py end to end on a small built index: every figure it reports is there.

A smoke test of the script (its floor server runs on the service's own supervisor and protocol,
the service is the real ``search-service``); the figures themselves are the benchmark's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "http_floor.py"


def test_http_floor_reports_each_part(tmp_path: Path, built_root: Path, small_gallery) -> None:
    x, _ = small_gallery
    queries = tmp_path / "queries.npy"
    np.save(queries, x[:64])
    out = tmp_path / "floor.json"
    cmd = [sys.executable, str(SCRIPT), "--root", str(built_root), "--queries", str(queries)]
    cmd += ["--workers", "2", "--clients", "4", "--rounds", "1", "--seconds", "1"]
    cmd += ["--workdir", str(tmp_path), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    res = json.loads(out.read_text())
    for name in ("floor", "service"):
        assert res[name]["qps"] > 0 and res[name]["cpu_us_per_request"] > 0
        assert res[name]["server_user_us"] > 0 and res[name]["client_us"] > 0
        assert res["rounds"][0][name]["qps"] == res[name]["qps"]
    assert res["raw_batch32_qps"] > 0 and res["service_of_raw"] > 0
    assert res["app_us_per_request"] > 0
    assert set(res["search_us_per_query"]) == {"1", "5", "32"}
    assert "service / raw" in done.stdout


def test_http_floor_needs_an_index(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--root and --queries are required" in done.stderr
