"""The README's main command, end to end on the committed demo data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import free_port

REPO = Path(__file__).resolve().parent.parent


def test_demo_builds_serves_and_answers(tmp_path):
    card = json.loads((REPO / "data" / "demo" / "card.json").read_text())
    assert card["rows"] == 8000
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--once",
            "--root",
            str(tmp_path / "index"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "verse]" in ln]
    assert len(lines) == 5
    # the same verse in the three other translations ranks first
    assert all("[same verse]" in ln for ln in lines[:3]), proc.stdout
