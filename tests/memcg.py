"""Run a command inside a memory cgroup (v1) with a limit, and read what it used.

The cgroup is created under ``/sys/fs/cgroup/memory/<unique name>``, limited
(``memory.limit_in_bytes``, and ``memory.memsw.limit_in_bytes`` where swap accounting exists so
that swap cannot stand in for memory), entered by the command's own shell before it ``exec``s,
and removed afterwards. :func:`unavailable` says why a test must skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

MOUNT = Path("/sys/fs/cgroup/memory")


def unavailable() -> str | None:
    """Why no memory cgroup can be made here (None: it can)."""
    if not (MOUNT / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller at {MOUNT}"
    probe = MOUNT / f"aqe-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(64 * 2**20))
    except OSError as exc:
        return f"cannot create a memory cgroup under {MOUNT}: {exc}"
    finally:
        if probe.exists():
            probe.rmdir()
    return None


class MemoryCgroup:
    """A fresh memory cgroup limited to ``limit`` bytes; a context manager that removes it."""

    def __init__(self, limit: int, name: str = "aqe-test") -> None:
        self.limit = limit
        self.path = MOUNT / f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.peak_rss = 0

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(self.limit))
        return self

    def __exit__(self, *exc: Any) -> None:
        for attempt in range(400):  # a killed process leaves the cgroup a moment after it is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                if attempt == 40:  # whatever is still in it was started inside it by this test
                    for pid in self.pids():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The processes in the cgroup now."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped so that it runs inside the cgroup."""
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *argv]

    def run(self, argv: list[str], sample_s: float = 0.05, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the cgroup; ``peak_rss`` records the largest anonymous memory seen."""
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                self.peak_rss = max(self.peak_rss, self.stat().get("total_rss", 0))
                done.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            return subprocess.run(self.command(argv), capture_output=True, text=True, **kwargs)
        finally:
            done.set()
            sampler.join()

    def stat(self) -> dict[str, int]:
        """``memory.stat`` as numbers (``total_rss`` anonymous, ``total_cache`` page cache, ...)."""
        try:
            text = (self.path / "memory.stat").read_text()
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in text.splitlines())}

    def max_usage(self) -> int:
        """The most memory (anonymous + page cache) charged to the cgroup at once."""
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def failcnt(self) -> int:
        """How often the limit was hit (the kernel then reclaimed page cache, or killed)."""
        return int((self.path / "memory.failcnt").read_text())
