"""Which index version is served: load, verify, warm up off the request path, swap atomically.

Requests read :attr:`IndexManager.searcher` once and keep that object to the end, so a swap never
changes the version under a request in flight; the old version is released when its last
request finishes. A version that fails to load is refused and remembered (not retried until
``current`` changes or a reload is forced), and the previous one keeps serving.

With ``local_copy_dir`` (``AQE_LOCAL_COPY_DIR``, on by default in the service) and memory
mapping on, a version is served from a private node-local copy (:mod:`aqe_retrieval.local_copy`):
files of the shared index root truncated, replaced or deleted underneath cannot kill the
process with SIGBUS. The copy of the version served before a swap is removed after it. On a
tmpfs, where a copy would be held in memory, the files are served in place (with a warning).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aqe_retrieval import artifact, local_copy
from aqe_retrieval.filters import DEFAULT_MAX_VALUES
from aqe_retrieval.searcher import Searcher
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadFailure:
    """The last version refused: which one, why, and when (epoch seconds)."""

    version: str | None
    error: str
    at: float


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``loaded`` a new version, found it ``unchanged``, or ``failed``."""

    status: str
    version: str | None
    error: str | None = None


class IndexManager:
    """Holds the served :class:`Searcher`; thread-safe reloads, lock-free reads."""

    def __init__(
        self,
        root: Path,
        verify_checksums: bool = True,
        mmap: bool = True,
        max_index_bytes: int | None = None,
        *,
        local_copy_dir: Path | None = None,
        max_filter_values: int = DEFAULT_MAX_VALUES,
    ) -> None:
        self.root = root
        if mmap and local_copy_dir is not None and local_copy.memory_backed(local_copy_dir):
            logger.warning(
                "AQE_LOCAL_COPY_DIR=%s is on a tmpfs, where a copy would be held in memory: serving "
                "the index root's files in place (a truncated file there can crash the service); "
                "point it at a disk",
                local_copy_dir,
            )
            local_copy_dir = None
        self.local_copy_dir = local_copy_dir if mmap else None  # unmapped arrays cannot SIGBUS
        self.max_filter_values = max_filter_values
        self.max_index_bytes = max_index_bytes
        self.verify_checksums = verify_checksums
        self.mmap = mmap
        self.searcher: Searcher | None = None
        self.last_failure: ReloadFailure | None = None
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[ReloadOutcome], None]] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexManager:
        """The manager the service's settings describe."""
        return cls(
            settings.index_root,
            settings.verify_checksums,
            settings.mmap,
            settings.max_index_bytes,
            local_copy_dir=settings.local_copy_dir,
            max_filter_values=settings.max_filter_values,
        )

    def subscribe(self, listener: Callable[[ReloadOutcome], None]) -> None:
        """Call ``listener`` with the outcome of every reload (metrics use this)."""
        self._listeners.append(listener)

    def reload(self, force: bool = False) -> ReloadOutcome:
        """Load ``current`` if it differs from the served version (always, with ``force``)."""
        with self._lock:
            outcome = self._reload_locked(force)
        for listener in self._listeners:
            listener(outcome)
        return outcome

    def _reload_locked(self, force: bool) -> ReloadOutcome:
        served = self.searcher.version if self.searcher else None
        try:
            target = artifact.current_version(self.root)
        except artifact.ArtifactError as exc:
            return self._fail(None, str(exc))
        if target is None:
            return ReloadOutcome("unchanged", served, "nothing published yet")
        if not force and (target == served or target == self._refused):
            return ReloadOutcome("unchanged", served)
        t0 = time.perf_counter()
        try:
            if self.max_index_bytes is not None:
                files = artifact.read_manifest(self.root, target).files.values()
                size = sum(f.bytes for f in files)
                if size > self.max_index_bytes:
                    return self._fail(
                        target,
                        f"version {target}: {size} bytes of files, over "
                        f"AQE_MAX_INDEX_BYTES={self.max_index_bytes}",
                    )
            if self.local_copy_dir is not None:
                keep = {target} | ({served} if served else set())
                art = local_copy.load(
                    self.root, target, self.local_copy_dir, check=self.verify_checksums, keep=keep
                )
            else:
                art = artifact.load(self.root, target, check=self.verify_checksums, mmap=self.mmap)
            searcher = Searcher(art, max_filter_values=self.max_filter_values)
            searcher.warm_up()
        except Exception as exc:  # any failure to load must leave the old version serving
            return self._fail(target, f"{type(exc).__name__}: {exc}")
        self.searcher = searcher
        self._refused = None
        if self.local_copy_dir is not None and served not in (None, target):
            try:  # requests still on the old version keep its (unlinked) pages mapped
                local_copy.remove_others(self.local_copy_dir, {target})
            except Exception:
                logger.exception("could not remove the local copy of version %s", served)
        logger.info("serving version %s (loaded in %.2fs; was %s)", target, time.perf_counter() - t0, served)
        return ReloadOutcome("loaded", target)

    def _fail(self, version: str | None, error: str) -> ReloadOutcome:
        self._refused = version
        self.last_failure = ReloadFailure(version, error, time.time())
        served = self.searcher.version if self.searcher else None
        logger.error("refused version %s: %s (still serving %s)", version, error, served)
        return ReloadOutcome("failed", version, error)

    def start_watching(self, interval_s: float) -> None:
        """Poll ``current`` every ``interval_s`` seconds in a daemon thread (0: never)."""
        if interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(interval_s,), name="index-watcher", daemon=True
        )
        self._thread.start()

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.reload()
            except Exception:  # the watcher must survive anything a reload throws
                logger.exception("index watcher: reload raised")

    def stop(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
