"""The scheduled rebuild: one locked build run that records how it went.

``index-builder nightly`` takes the same inputs as ``build``. It holds the root's
:func:`artifact.build_lock` for the whole run, the lock ``build`` and ``rollback`` take too (a
second writer started meanwhile exits with :data:`EXIT_LOCKED` and touches nothing), builds
and publishes a version (publishing is atomic and prunes old versions), and writes a status
record atomically at :func:`artifact.status_path`. A failed run publishes nothing, so the
previous version stays current; the record says why and counts consecutive failures. The
search service reads the record with :func:`aqe_retrieval.artifact.read_status`.

Exit status: 0 success, 1 failure, 2 bad input or arguments, 3 another run holds the lock,
4 the quality gate refused the build.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aqe_retrieval import artifact
from aqe_retrieval.errors import EXIT_LOCKED, EXIT_OK, LockedError, Terminated, exit_code
from aqe_retrieval.status import Failure, NightlyStatus, Success
from index_builder.build import build
from index_builder.config import BuildConfig

logger = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


exclusive_lock = artifact.build_lock
"""The root's build lock (kept under its old name for callers)."""


def run_nightly(
    config: BuildConfig,
    *,
    build_fn: Callable[[BuildConfig], Any] = build,
    clock: Callable[[], datetime] = _utcnow,
) -> tuple[int, NightlyStatus | None]:
    """One locked build run that records its outcome; returns (exit code, status written).

    ``build_fn`` and ``clock`` are seams for tests. A refused run returns ``(EXIT_LOCKED, None)``.
    """
    try:
        with artifact.build_lock(config.root):
            return _locked_run(config, build_fn, clock)
    except LockedError as exc:
        logger.error("%s; not starting", exc)
        return EXIT_LOCKED, None


def _locked_run(
    config: BuildConfig, build_fn: Callable[[BuildConfig], Any], clock: Callable[[], datetime]
) -> tuple[int, NightlyStatus]:
    root = config.root
    previous = artifact.load_status(root)
    status = NightlyStatus(host=socket.gethostname(), pid=os.getpid(), last_run_started=clock())
    if previous is not None:  # carry the history over
        status = previous.model_copy(
            update=status.model_dump(include={"format_version", "host", "pid", "last_run_started"})
        )
    artifact.write_status(root, status)  # visible as "running": started after the last finish
    logger.info("nightly build of %s into %s started", config.gallery, root)
    t0 = time.perf_counter()
    try:
        manifest = build_fn(config)
    except BaseException as exc:
        code = exit_code(exc)
        status.last_failure = Failure(time=clock(), error=f"{type(exc).__name__}: {exc}")
        status.consecutive_failures += 1
        _finish(root, status, ok=False, started=t0, clock=clock)
        current = artifact.current_version(root)
        logger.error(
            "nightly build failed (%d in a row; %s): %s",
            status.consecutive_failures,
            f"{current} stays current" if current else "nothing published yet",
            exc,
        )
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: recorded, then let them end the process
        return code, status
    status.last_success = Success(time=clock(), version=manifest.version)
    status.consecutive_failures = 0
    _finish(root, status, ok=True, started=t0, clock=clock)
    logger.info("nightly build published %s in %.1fs", manifest.version, status.duration_s)
    return EXIT_OK, status


def _finish(
    root: Path, status: NightlyStatus, *, ok: bool, started: float, clock: Callable[[], datetime]
) -> None:
    status.last_run_finished = clock()
    status.last_run_ok = ok
    status.duration_s = round(time.perf_counter() - started, 3)
    artifact.write_status(root, status)


def run_until_sigterm(config: BuildConfig) -> tuple[int, NightlyStatus | None]:
    """:func:`run_nightly` with SIGTERM turned into a recorded failure (exit status 143)."""
    previous = signal.getsignal(signal.SIGTERM)
    # A scheduler stops a job with SIGTERM: make it an exception so the failure is recorded.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run_nightly(config)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)
