"""Crashes and faults in the builder: SIGKILLs at random points, a full disk, unusable inputs.

The kill tests are ``scripts/crash_test.py`` run small (20 kills of an 8,000 x 32 build). The fault
cases run ``index-builder build`` in-process where they can (fast) and as a process where the
fault needs one (a FIFO, a real full file system).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aqe_retrieval import artifact
from index_builder.cli import main as builder

REPO = Path(__file__).resolve().parents[1]


def crash_test(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "crash.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "crash_test.py"), *args, "--no-faults", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert all(record["checks"].values()), record["checks"]
    return record


@pytest.mark.slow
def test_twenty_killed_builds_leave_a_consistent_index_root(tmp_path):
    # --launcher fork: cli.main() in processes forked from a server that imported the builder,
    # so the 20 kills cost build time only, not 20 interpreter start-ups.
    record = crash_test(
        tmp_path,
        "--launcher",
        "fork",
        "--kills",
        "20",
        "--small-kills",
        "0",
        "--rows",
        "8000",
        "--dim",
        "32",
        "--recover-every",
        "7",
    )
    assert record["killed"] >= 20
    phases = set(record["phases"]) - {"completed before the kill"}
    assert len(phases) >= 3, phases
    assert any(p.startswith("publish") for p in phases), phases
    assert len(record["recoveries"]) >= 3


@pytest.mark.slow
def test_killed_cli_processes_leave_a_consistent_index_root(tmp_path):
    """A few kills of the real thing: ``python -m index_builder.cli build`` processes."""
    record = crash_test(
        tmp_path,
        "--kills",
        "4",
        "--small-kills",
        "0",
        "--rows",
        "3000",
        "--dim",
        "32",
        "--recover-every",
        "4",
    )
    assert record["killed"] >= 4 and len(record["recoveries"]) >= 1


@pytest.fixture
def root(tmp_path, built_root) -> Path:
    """A copy of ``built_root``: one published version that a failed build must not touch."""
    copy = tmp_path / "root"
    shutil.copytree(built_root, copy)
    return copy


def snapshot(root: Path) -> tuple[str | None, list[str], list[str]]:
    """current, the versions, and any staging directories."""
    return (
        artifact.current_version(root),
        artifact.version_ids(root),
        sorted(p.name for p in root.glob(f"{artifact.STAGING_PREFIX}*")),
    )


@pytest.fixture
def bad_inputs(tmp_path, small_gallery) -> dict[str, Path]:
    _, paths = small_gallery
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty").mkdir()
    (bad / "truncated.npy").write_bytes(paths["gallery"].read_bytes()[:200])
    (bad / "text.npy").write_text("no array here\n")
    (bad / "ids-dir").mkdir()
    (bad / "meta.bin").write_bytes(bytes(range(256)) * 4)
    (bad / "short-ids.txt").write_text("a\nb\n")
    np.save(bad / "ints.npy", np.ones((10, 4), np.int64))
    return {**paths, **{p.name.replace(".", "_").replace("-", "_"): p for p in bad.iterdir()}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gallery", "{empty}"], "directory holds no .npy shards"),
        (["--gallery", "{truncated_npy}"], "truncated.npy: not a readable .npy array"),
        (["--gallery", "{text_npy}"], "text.npy: not a readable .npy array"),
        (["--gallery", "/dev/null"], "/dev/null: not a regular file or directory"),
        (["--gallery", "{empty}/missing.npy"], "missing.npy: no such file or directory"),
        (["--gallery", "{ints_npy}"], "dtype int64 is not accepted"),
        (["--gallery", "{gallery}", "--ids", "{ids_dir}"], "ids-dir: cannot read ids"),
        (["--gallery", "{gallery}", "--ids", "{short_ids_txt}"], "2 ids for 600 embeddings"),
        (["--gallery", "{gallery}", "--metadata", "{meta_bin}"], "meta.bin: cannot read metadata"),
    ],
)
def test_unusable_input_fails_cleanly_and_publishes_nothing(root, bad_inputs, caplog, args, message):
    before = snapshot(root)
    argv = ["build", *(a.format(**bad_inputs) for a in args), "--root", str(root), "--no-progress"]
    with caplog.at_level(logging.ERROR):
        assert builder(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(message in e for e in errors), errors
    assert snapshot(root) == before


def test_a_fifo_as_gallery_is_refused_not_waited_on(tmp_path, root):
    fifo = tmp_path / "gallery.npy"
    os.mkfifo(fifo)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "index_builder.cli",
                "build",
                "--gallery",
                str(fifo),
                "--root",
                str(root),
                "--no-progress",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("index-builder build still waits on the FIFO after 5 s")
    assert proc.returncode == 2 and "gallery.npy" in proc.stderr


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FULL_DISK_AT = {
    "level arrays": ("numpy.save", _no_space),
    "serving index": ("faiss.write_index", _no_space),
    "manifest": ("aqe_retrieval.artifact._write_atomic", _no_space),
}


@pytest.mark.parametrize("where", list(FULL_DISK_AT))
def test_full_disk_publishes_nothing_and_cleans_up(root, small_gallery, monkeypatch, where):
    _, paths = small_gallery
    target, fake = FULL_DISK_AT[where]
    monkeypatch.setattr(target, fake)
    before = snapshot(root)
    status = builder(["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"])
    assert status == 1
    assert snapshot(root) == before


def test_full_disk_is_reported_as_a_clear_error(root, small_gallery, monkeypatch, caplog):
    _, paths = small_gallery
    monkeypatch.setattr("numpy.save", _no_space)
    with caplog.at_level(logging.ERROR):
        status = builder(["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"])
    assert status == 1
    assert any("No space left on device" in r.getMessage() for r in caplog.records)


def test_a_real_full_file_system(tmp_path):
    """A 10,000 x 64 build (2.5 MB a level) into a 2 MiB tmpfs (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        gallery = tmp_path / "gallery.npy"
        np.save(gallery, np.random.default_rng(0).standard_normal((10_000, 64), np.float32))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "index_builder.cli",
                "build",
                "--gallery",
                str(gallery),
                "--root",
                str(mnt / "root"),
                "--no-progress",
                "--threads",
                "1",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "written" in proc.stderr or "No space left" in proc.stderr, proc.stderr[-2000:]
        assert snapshot(mnt / "root") == (None, [], [])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
