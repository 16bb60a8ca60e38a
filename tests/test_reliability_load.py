"""Load with swaps: ``scripts/load_test.py`` run short against a real ``search-service`` process.

8 clients for 8 seconds while versions are published every 1.5 s and ``/admin/reload`` is hit
at random; the script itself checks zero failures, the version rule, monotonic versions and that
old versions are released. Its version checker is also tested here on made-up timelines.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", REPO / "scripts" / "load_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["load_test"]


@pytest.mark.slow
def test_short_load_with_swaps(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "load_test.py"),
            "--clients",
            "8",
            "--duration",
            "8",
            "--rows",
            "2000",
            "--dim",
            "32",
            "--publish-every",
            "1.5",
            "--reload-every",
            "1",
            "--reload-interval",
            "0.2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    assert s["passed"] and all(s["checks"].values()), s["checks"]
    assert s["failed"] == 0 and s["requests"] >= 200
    assert s["publishes"] >= 2 and s["versions_served"] >= 2
    assert s["mapped_versions_after"] == [s["served_last"]]
    assert all(s["latency"][w]["n"] > 0 for w in ("before", "during", "after"))
    assert "PASSED" in proc.stdout


def test_version_checker_accepts_a_clean_timeline(load_test):
    R, P = load_test.Record, load_test.Publish
    publishes = [P(1.0, 1.5, "v2"), P(3.0, 3.5, "v3")]
    records = [
        R(0.0, 0.1, 200, "v1"),
        R(1.4, 1.6, 200, "v2"),
        R(1.55, 1.7, 200, "v1"),
        R(2.0, 2.1, 200, "v2"),
        R(3.6, 3.7, 200, "v3"),
    ]
    assert load_test.check_versions(records, publishes, "v1", stale_after=0.5) == ([], [])


@pytest.mark.parametrize(
    ("record", "kind", "message"),
    [
        (("v2", 0.2, 0.3), 0, "before its build began"),
        (("v1", 2.5, 2.6), 0, "after it was replaced"),
        (("v9", 2.0, 2.1), 0, "unknown version"),
        (("v1", 1.8, 1.9), 1, "after v2 had answered"),
    ],
)
def test_version_checker_catches_violations(load_test, record, kind, message):
    R, P = load_test.Record, load_test.Publish
    publishes = [P(1.0, 1.5, "v2"), P(3.0, 3.5, "v3")]
    version, start, end = record
    records = [R(0.0, 0.1, 200, "v1"), R(1.6, 1.7, 200, "v2"), R(start, end, 200, version)]
    problems = load_test.check_versions(records, publishes, "v1", stale_after=0.5)
    assert any(message in p for p in problems[kind]), problems
