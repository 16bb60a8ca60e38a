"""The nightly job: lock contention, status record, failed runs keep the old version, pruning."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from aqe_retrieval import artifact, errors
from aqe_retrieval.status import staleness_seconds
from index_builder import cli, nightly
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams

N, D = 300, 16


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    path = tmp_path / "gallery.npy"
    np.save(path, np.random.default_rng(0).standard_normal((N, D)).astype(np.float32))
    return path


def _run(gallery: Path, root: Path, *extra: str) -> int:
    return cli.main(
        ["nightly", "--gallery", str(gallery), "--root", str(root), "--qe-k", "3", "--no-progress", *extra]
    )


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_success_records_status_and_publishes(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"
    assert _run(gallery, root) == 0
    status = artifact.read_status(root)
    assert status is not None
    current = artifact.current_version(root)
    assert current is not None
    assert status["last_success"]["version"] == current
    assert status["last_failure"] is None
    assert status["consecutive_failures"] == 0
    assert status["last_run_ok"] is True
    assert status["duration_s"] >= 0
    assert status["host"]
    started = datetime.fromisoformat(status["last_run_started"])
    finished = datetime.fromisoformat(status["last_run_finished"])
    assert started <= finished
    # The record is plain JSON at the artifact module's path.
    assert json.loads(artifact.status_path(root).read_text())["last_success"]["version"] == current


def test_failure_keeps_previous_version_and_records_why(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"
    assert _run(gallery, root) == 0
    good = artifact.current_version(root)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.arange(N * D, dtype=np.int64).reshape(N, D))  # not a float dtype
    assert _run(bad, root) == 2
    assert _run(tmp_path / "missing.npy", root) == 2
    assert artifact.current_version(root) == good
    assert artifact.version_ids(root) == [good]
    assert artifact.verify(root) == []
    status = artifact.read_status(root)
    assert status is not None
    assert status["last_run_ok"] is False
    assert status["consecutive_failures"] == 2
    assert status["last_success"]["version"] == good
    assert "missing.npy" in status["last_failure"]["error"]
    assert not list(root.glob(f"{artifact.STAGING_PREFIX}*"))
    # The next success resets the count.
    assert _run(gallery, root) == 0
    status = artifact.read_status(root)
    assert status is not None
    assert status["consecutive_failures"] == 0
    assert status["last_failure"] is not None  # history kept
    assert status["last_success"]["version"] == artifact.current_version(root) != good


def test_other_failure_exits_1_and_is_recorded(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"

    def broken(config: BuildConfig):
        raise RuntimeError("disk on fire")

    code, status = nightly.run_nightly(BuildConfig(gallery=gallery, root=root), build_fn=broken)
    assert code == 1
    assert status is not None
    assert status.last_failure is not None
    assert status.last_failure.error == "RuntimeError: disk on fire"
    assert artifact.current_version(root) is None


def test_second_run_is_refused_while_the_first_holds_the_lock(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"
    started, release = threading.Event(), threading.Event()
    results: list[tuple[int, object]] = []

    def slow_build(config: BuildConfig):
        started.set()
        assert release.wait(30)
        return build(config)

    config = BuildConfig(gallery=gallery, root=root, params=AqeParams(qe_k=3), show_progress=False)
    first = threading.Thread(target=lambda: results.append(nightly.run_nightly(config, build_fn=slow_build)))
    first.start()
    try:
        assert started.wait(30)
        before = _tree(root)
        status_before = artifact.read_status(root)
        code, status = nightly.run_nightly(config)
        assert (code, status) == (errors.EXIT_LOCKED, None)
        assert _tree(root) == before  # the refused run touched nothing
        assert artifact.read_status(root) == status_before
        # The record of the run in progress: started after its last finish (here: never).
        assert status_before is not None
        assert status_before["last_run_finished"] is None
    finally:
        release.set()
        first.join(60)
    assert results[0][0] == 0
    # Once released, the lock can be taken again.
    assert nightly.run_nightly(config)[0] == 0


def test_lock_is_refused_across_processes(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"
    code = (
        "import sys\n"
        "from index_builder import cli\n"
        f"sys.exit(cli.main(['nightly', '--gallery', {str(gallery)!r}, '--root', {str(root)!r}]))\n"
    )
    with nightly.exclusive_lock(root):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == errors.EXIT_LOCKED, proc.stderr
    assert "another build holds" in proc.stderr
    assert artifact.current_version(root) is None
    assert artifact.read_status(root) is None


def test_sigterm_is_recorded_as_a_failure(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"
    code = (
        "import signal, sys, time\n"
        "from pathlib import Path\n"
        "from index_builder import nightly\n"
        "from index_builder.config import BuildConfig\n"
        "signal.signal(signal.SIGTERM, nightly._raise_on_sigterm)\n"
        f"config = BuildConfig(gallery=Path({str(gallery)!r}), root=Path({str(root)!r}))\n"
        "sys.exit(nightly.run_nightly(config, build_fn=lambda c: time.sleep(60))[0])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while artifact.read_status(root) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    status = artifact.read_status(root)
    assert status is not None
    assert status["last_run_ok"] is False
    assert status["last_failure"]["error"] == "Terminated: stopped by SIGTERM"
    assert status["consecutive_failures"] == 1


def test_old_versions_are_pruned(gallery: Path, tmp_path: Path) -> None:
    root = tmp_path / "index"
    published = []
    for _ in range(4):
        assert _run(gallery, root, "--keep", "2") == 0
        published.append(artifact.current_version(root))
    assert artifact.version_ids(root) == published[-2:]
    assert artifact.current_version(root) == published[-1]


def test_status_clock_is_injectable(gallery: Path, tmp_path: Path) -> None:
    t = datetime(2030, 6, 1, 2, 0, tzinfo=UTC)
    config = BuildConfig(gallery=gallery, root=tmp_path, params=AqeParams(qe_k=3), show_progress=False)
    code, status = nightly.run_nightly(config, clock=lambda: t)
    assert code == 0
    assert status is not None
    assert status.last_run_started == status.last_run_finished == t
    assert staleness_seconds(artifact.read_status(tmp_path), t + timedelta(days=1)) == 86400


def test_index_builder_nightly_command(
    gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "index"
    assert (
        cli.main(["nightly", "--gallery", str(gallery), "--root", str(root), "--qe-k", "3", "--no-progress"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["last_success"]["version"] == artifact.current_version(root)
