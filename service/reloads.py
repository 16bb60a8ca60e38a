"""Admin reloads that reach every worker process, through a counter file they share.

``POST /admin/reload`` lands in one worker process. That worker bumps a counter in a file of
the run's private directory (the one ``search-service`` makes for the workers' metrics) and
reloads; every worker polls the file every :data:`POLL_S` seconds and, when the counter has
moved, reloads too (forced, like the admin's: a version that was refused is retried). The file
is updated under an exclusive ``flock`` and replaced by rename, so a reader never sees half of it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

POLL_S = 0.25
FILE = "reload-requests"


class ReloadRequests:
    """The shared reload counter of a multi-process server, and this worker's poller."""

    def __init__(self, directory: Path, reload: Callable[[], object]) -> None:
        self.path = directory / FILE
        self.lock_path = directory / (FILE + ".lock")
        self.reload = reload
        self._lock = threading.Lock()  # one of request() and a poll at a time in this worker
        self._seen = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="reload-requests", daemon=True)

    def read(self) -> int:
        """The number of reloads requested in the whole server so far."""
        try:
            return int(self.path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def request(self) -> None:
        """Ask every other worker to reload (the caller reloads itself)."""
        with self._lock, self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            count = self.read() + 1
            tmp = self.path.with_name(f"{FILE}.{os.getpid()}.tmp")
            tmp.write_text(str(count))
            tmp.replace(self.path)
            self._seen = count  # this worker's own request: it reloads in the request

    def start(self) -> None:
        """Poll the counter in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                count = self.read()
                if count == self._seen:
                    continue
                self._seen = count
            try:
                self.reload()
            except Exception:  # the poller must survive anything a reload throws
                logger.exception("reload requested by another worker raised")
