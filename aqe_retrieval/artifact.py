"""The on-disk artifact: the one module that knows its layout, file names and manifest.

::

    ROOT/
      current                       the published version id (replaced atomically)
      versions/<version>/
        manifest.json               Manifest (format_version, parameters, checksums, ...)
        level_<t>.npy               normalised gallery rows of level t (t = 0 .. qe_times-1)
        level_<t>_norms.npy         their norms (raw row = norm * normalised row)
        level_<t>.faiss             the index online expansion searches in level t, if any
        level_<t>.ivfdata           its inverted lists, when built out of core (on-disk lists)
        serving.faiss               FAISS index over the normalised expanded rows
        serving.ivfdata             its inverted lists, when built out of core
        ids.npy                     external ids (str), when given
        meta_<i>.npy                metadata column i (name and type in the manifest)
        graph_<t>_ids.npy           level t's top-qe_k graph: neighbour rows (n, k) int64
        graph_<t>_sims.npy          ... and their cosines (n, k) float32
        delta_*.npy                 a version made by add/delete: see below
      .staging-<version>-<pid>/     a version being written (never read by a loader)
        .scratch/                   the build's temporary memory-mapped arrays (removed before publishing)
      nightly_status.json           the scheduled job's last run (aqe_retrieval.status)
      .build.lock                   held by every writer: build, nightly, rollback

A version is written into a staging directory, fsynced, renamed into ``versions/`` and only then
made ``current`` by an atomic replace of the pointer file: a reader sees the old version or the
new one, never half of one. Every writer holds :func:`build_lock` (an exclusive ``flock``) while
it writes, so leftovers of a killed writer are removed by the next one that holds the lock,
whatever host or container it ran on. Nothing is pickled: arrays are ``.npy`` loaded with
``allow_pickle=False``, indexes FAISS's own format.

A version made by ``add``/``delete`` (format 2, ``manifest.delta``) holds the files of the full
build it descends from (its *base*) as hard links (no copy; a file's bytes live as long as one
version links it, so pruning the base never breaks it) plus a small delta, cumulative since the
base: ``delta_dead.npy`` (base rows deleted), ``delta_ids.npy``/``delta_meta_<i>.npy`` (the
appended rows' ids and metadata), and per level ``delta_level_<t>_{pos,rows,norms}.npy`` and
``delta_graph_<t>_{pos,ids,sims}.npy`` (the rows whose values or neighbours changed, by their
position in the version; ``t = qe_times`` is the served level). :func:`load` presents it as a
full build would: the base rows not deleted, in order, then the appended rows (compacted, so row
numbers are a full build's over the same gallery), through :mod:`aqe_retrieval.delta`. The
base's approximate indexes (serving or expansion, any kind, on-disk lists included) are read
from their hard-linked files and served masked, with the delta rows beside them
(:class:`aqe_retrieval.overlay.DeltaIndex`); a flat serving index is rebuilt over the view. Delta
rows are stored in their level's dtype (float16 levels: float16), the served level in float32.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import ValidationError

from aqe_retrieval import delta, overlay
from aqe_retrieval.errors import ArtifactError, LockedError
from aqe_retrieval.logs import native_stdout_to_stderr
from aqe_retrieval.manifest import (
    DELTA_FORMAT_VERSION,
    LEVEL_DTYPES,
    READABLE_FORMATS,
    SERVING_INDEX,
    DeltaEntry,
    DeltaGraph,
    DeltaLevel,
    FileEntry,
    GraphEntry,
    LevelEntry,
    Manifest,
    MetadataColumn,
    ServingIndexEntry,
)
from aqe_retrieval.status import NightlyStatus

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "current"
VERSIONS = "versions"
IDS = "ids.npy"
STAGING_PREFIX = ".staging-"
SCRATCH = ".scratch"
SERVING_IVFDATA = "serving.ivfdata"
WRITE_BLOCK = 65536
STATUS = "nightly_status.json"
LOCK = ".build.lock"
CHANGES = "changes"
"""The change log: one immutable record per applied add/delete (:func:`record_change`)."""
VERSION_RE = re.compile(r"^\d{8}T\d{6}\d{6}Z-[0-9a-f]{6}$")


def write_status(root: Path, status: NightlyStatus) -> None:
    """Record the scheduled job's run under ``root``, atomically (fsynced, then renamed)."""
    _write_atomic(status_path(root), status.model_dump_json(indent=2).encode())


def load_status(root: Path) -> NightlyStatus | None:
    """The scheduled job's last record under ``root``; None if there is none or it is unreadable."""
    path = status_path(Path(root))
    try:
        return NightlyStatus.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        logger.warning("%s: unreadable nightly status, ignored (%s)", path, exc)
        return None


def read_status(root: Path) -> dict[str, Any] | None:
    """The last nightly status record under ``root`` as JSON-ready data; None if none is valid."""
    status = load_status(root)
    return None if status is None else status.model_dump(mode="json")


def status_path(root: Path) -> Path:
    """Where the scheduled job records its last run under ``root``."""
    return root / STATUS


def lock_path(root: Path) -> Path:
    """The lock file every writer of ``root`` holds (:func:`build_lock`)."""
    return root / LOCK


_held: dict[str, int] = {}  # resolved root -> the thread of this process that holds its lock
_held_guard = threading.Lock()
_live_staging: set[Path] = set()  # staging directories this process is writing


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Hold the build lock of ``root`` (non-blocking); raises :class:`LockedError` if taken.

    Every writer takes it: ``index-builder build``, ``nightly`` and ``rollback`` (and
    :func:`staging`, for Python callers). Re-entrant in the thread that holds it; another
    thread or process is refused. An ``flock`` is released by the kernel when its holder dies,
    so a killed build never leaves a stale lock; across hosts it needs a filesystem that
    shares ``flock`` (NFSv4 and cluster filesystems do).
    """
    root.mkdir(parents=True, exist_ok=True)
    key, me = str(root.resolve()), threading.get_ident()
    with _held_guard:
        mine = _held.get(key) == me
    if mine:
        yield
        return
    path = lock_path(root)
    # O_CREAT without O_TRUNC: a refused run must not alter the holder's lock file.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise LockedError(
                f"{root}: another build holds {path.name} ({holder}); try again when it has finished"
            ) from None
        os.ftruncate(fd, 0)
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        with _held_guard:
            _held[key] = me
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
    finally:
        os.close(fd)  # closing releases the lock; the file stays so that it is never raced


def new_version_id() -> str:
    """A sortable, unique version id: UTC time to the microsecond plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def check_version_id(version: str) -> str:
    """Return ``version`` if it is a well-formed id (so it can never escape the root)."""
    if not VERSION_RE.match(version):
        raise ArtifactError(f"{version!r} is not a version id")
    return version


# ---------------------------------------------------------------- writing


class Staging:
    """A version being written; files go in with the ``save_*`` methods, then :meth:`publish`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = new_version_id()
        self.path = root / f"{STAGING_PREFIX}{self.version}-{os.getpid()}"
        self.levels: list[LevelEntry] = []
        self.metadata: list[MetadataColumn] = []
        self.ids_file: str | None = None
        self.serving = ServingIndexEntry()
        self.graphs: list[GraphEntry] = []
        self.known: dict[str, FileEntry] = {}  # hard-linked files: checksums taken from the parent

    def scratch_dir(self) -> Path:
        """A directory for the build's temporary files; removed before :meth:`publish`."""
        path = self.path / SCRATCH
        path.mkdir(exist_ok=True)
        return path

    def level_rows_path(self, level: int) -> Path:
        """Where level ``level``'s rows go: a builder may write them there directly (a memmap)."""
        return self.path / f"level_{level}.npy"

    def level_norms_path(self, level: int) -> Path:
        """Where level ``level``'s norms go (float32)."""
        return self.path / f"level_{level}_norms.npy"

    def level_ivfdata_path(self, level: int) -> Path:
        """Where the on-disk inverted lists of level ``level``'s index go."""
        return self.path / f"level_{level}.ivfdata"

    def serving_ivfdata_path(self) -> Path:
        """Where the on-disk inverted lists of the serving index go."""
        return self.path / SERVING_IVFDATA

    def save_level(
        self,
        level: int,
        rows: np.ndarray,
        norms: np.ndarray,
        index: Any = None,
        index_type: str = "exact",
        nprobe: int | None = None,
        ef_search: int | None = None,
        recall_at_k: float | None = None,
        recall_k: int | None = None,
        dtype: str = "float32",
    ) -> None:
        """Store level ``level``'s normalised rows (n, d) as ``dtype``, norms (n,), optional index.

        Rows or norms already memory-mapped at their final path (:meth:`level_rows_path`) are
        flushed, not copied; others are written block by block.
        """
        if dtype not in LEVEL_DTYPES:
            raise ValueError(f"level dtype must be one of {LEVEL_DTYPES}, got {dtype!r}")
        entry = LevelEntry(
            level=level,
            rows=self.level_rows_path(level).name,
            norms=self.level_norms_path(level).name,
            dtype=dtype,
            index_type=index_type,
            nprobe=nprobe,
            ef_search=ef_search,
            recall_at_k=recall_at_k if index is not None else None,
            recall_k=recall_k if index is not None else None,
        )
        _save_npy(self.path / entry.rows, rows, np.dtype(dtype))
        _save_npy(self.path / entry.norms, norms, np.dtype(np.float32))
        if index is not None:
            entry.index = f"level_{level}.faiss"
            entry.ivfdata = self._ivfdata_name(index, self.level_ivfdata_path(level))
            faiss.write_index(index, str(self.path / entry.index))
        self.levels.append(entry)

    def save_serving_index(self, index: Any, entry: ServingIndexEntry) -> None:
        """Store the serving index over the normalised expanded rows."""
        entry.ivfdata = self._ivfdata_name(index, self.serving_ivfdata_path())
        faiss.write_index(index, str(self.path / SERVING_INDEX))
        self.serving = entry

    def _ivfdata_name(self, index: Any, expected: Path) -> str | None:
        """The file name of ``index``'s on-disk inverted lists (they must be at ``expected``)."""
        ivf = faiss.try_extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None and ivf.invlists else None
        if not isinstance(lists, faiss.OnDiskInvertedLists):
            return None
        if Path(lists.filename).resolve() != expected.resolve():
            raise ArtifactError(f"inverted lists at {lists.filename}, expected {expected}")
        return expected.name

    def save_ids(self, ids: list[str]) -> None:
        """Store the external ids (one per row)."""
        self.ids_file = IDS
        np.save(self.path / IDS, np.array(ids, dtype=np.str_))

    def save_metadata(self, columns: dict[str, np.ndarray]) -> None:
        """Store metadata columns (int, float or str arrays of n rows)."""
        for i, (name, values) in enumerate(columns.items()):
            col = MetadataColumn(name=name, dtype=values.dtype.kind, file=f"meta_{i}.npy")
            np.save(self.path / col.file, values, allow_pickle=False)
            self.metadata.append(col)

    def save_graph(self, level: int, ids: np.ndarray, sims: np.ndarray) -> None:
        """Store level ``level``'s top-k graph: ids (n, k) int64, sims (n, k) float32."""
        entry = GraphEntry(level=level, ids=f"graph_{level}_ids.npy", sims=f"graph_{level}_sims.npy")
        np.save(self.path / entry.ids, np.ascontiguousarray(ids, dtype=np.int64))
        np.save(self.path / entry.sims, np.ascontiguousarray(sims, dtype=np.float32))
        self.graphs.append(entry)

    def link_base(self, root: Path, parent: Manifest) -> None:
        """Hard-link every base file of ``parent`` (not its delta) into this version: no copy."""
        src = version_dir(root, parent.version)
        own = set(parent.delta.file_names()) if parent.delta else set()
        for name, entry in parent.files.items():
            if name not in own:
                os.link(src / name, self.path / name)
                self.known[name] = entry
        self.levels = [e.model_copy() for e in parent.levels]
        self.serving = parent.serving_index.model_copy()
        self.ids_file, self.metadata = parent.ids_file, [c.model_copy() for c in parent.metadata]
        self.graphs = [g.model_copy() for g in parent.graphs]

    def save_delta(
        self,
        base_version: str,
        base_n: int,
        dead: np.ndarray,
        appended_ids: list[str] | None,
        appended_metadata: dict[str, np.ndarray],
        levels: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
        graphs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
        appended: int,
    ) -> DeltaEntry:
        """Store a delta over the linked base: see the module docstring for what each file holds.

        ``levels[t]`` = (positions, normalised rows, norms or None), the rows stored in level
        ``t``'s dtype (the served level ``qe_times``: float32); ``graphs[t]`` = (positions,
        ids, sims); ``appended_metadata`` in the order of the base's metadata columns.
        """
        entry = DeltaEntry(base_version=base_version, base_n=base_n, dead="delta_dead.npy", appended=appended)
        np.save(self.path / entry.dead, np.asarray(dead, dtype=np.int64))
        if appended_ids is not None:
            entry.ids = "delta_ids.npy"
            np.save(self.path / entry.ids, np.array(appended_ids, dtype=np.str_))
        for i, values in enumerate(appended_metadata.values()):
            entry.metadata.append(f"delta_meta_{i}.npy")
            np.save(self.path / entry.metadata[-1], values, allow_pickle=False)
        for t, (pos, rows, norms) in enumerate(levels):
            lv = DeltaLevel(level=t, pos=f"delta_level_{t}_pos.npy", rows=f"delta_level_{t}_rows.npy")
            np.save(self.path / lv.pos, np.asarray(pos, dtype=np.int64))
            # stored in the level's dtype (float16 levels: float16 deltas); the served level is float32
            dtype = np.dtype(self.levels[t].dtype) if t < len(self.levels) else np.dtype(np.float32)
            np.save(self.path / lv.rows, np.ascontiguousarray(rows, dtype=dtype))
            if norms is not None:
                lv.norms = f"delta_level_{t}_norms.npy"
                np.save(self.path / lv.norms, np.asarray(norms, dtype=np.float32))
            entry.levels.append(lv)
        for t, (pos, ids, sims) in enumerate(graphs):
            g = DeltaGraph(
                level=t,
                pos=f"delta_graph_{t}_pos.npy",
                ids=f"delta_graph_{t}_ids.npy",
                sims=f"delta_graph_{t}_sims.npy",
            )
            np.save(self.path / g.pos, np.asarray(pos, dtype=np.int64))
            np.save(self.path / g.ids, np.asarray(ids, dtype=np.int64))
            np.save(self.path / g.sims, np.asarray(sims, dtype=np.float32))
            entry.graphs.append(g)
        return entry

    def load_levels(self, n: int, d: int) -> list[Level]:
        """The levels saved so far, memory-mapped back (for checks before publishing)."""
        return [
            Level(
                _load_npy(self.path / e.rows, "r", (n, d), np.dtype(e.dtype)),
                _load_npy(self.path / e.norms, "r", (n,), np.float32),
                _read_index(self.path / e.index, n, d, True, e.ivfdata is not None) if e.index else None,
                e,
            )
            for e in self.levels
        ]

    def publish(self, keep: int = 3, **fields: Any) -> Manifest:
        """Checksum, write the manifest, fsync, rename into place, switch ``current``, prune."""
        shutil.rmtree(self.path / SCRATCH, ignore_errors=True)
        files = {}
        for p in sorted(self.path.iterdir()):
            if p.name in self.known:  # a hard link of a published, fsynced, checksummed file
                files[p.name] = self.known[p.name]
                continue
            files[p.name] = FileEntry(sha256=_sha256(p), bytes=p.stat().st_size)
            _fsync(p)
        manifest = Manifest(
            version=self.version,
            created_at=datetime.now(UTC),
            levels=self.levels,
            serving_index=self.serving,
            ids_file=self.ids_file,
            metadata=self.metadata,
            graphs=self.graphs,
            files=files,
            software=software_versions(),
            **fields,
        )
        _write_atomic(self.path / MANIFEST, manifest.model_dump_json(indent=2).encode())
        _fsync(self.path)
        versions = self.root / VERSIONS
        versions.mkdir(exist_ok=True)
        final = versions / self.version
        os.rename(self.path, final)
        _fsync(versions)
        set_current(self.root, self.version)
        logger.info("published version %s under %s", self.version, self.root)
        prune(self.root, keep)
        return manifest


@contextmanager
def staging(root: Path) -> Iterator[Staging]:
    """A fresh staging directory under ``root``, written under :func:`build_lock`.

    Leftovers of earlier writers are removed first; the directory is removed again unless it
    was published.
    """
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root):
        clean_stale_staging(root)
        stage = Staging(root)
        stage.path.mkdir()
        _live_staging.add(stage.path)
        try:
            yield stage
        finally:
            _live_staging.discard(stage.path)
            if stage.path.exists():
                shutil.rmtree(stage.path, ignore_errors=True)


def clean_stale_staging(root: Path) -> list[Path]:
    """Remove the staging directories and temporary files writers left behind; returns them.

    Runs under :func:`build_lock`. Every writer holds that lock while it writes, so whoever
    holds it knows that no other writer is alive: every leftover but this process's own live
    staging directory is removed, whichever host, container or PID made it (a PID means
    nothing across containers or hosts). When another process holds the lock, it is the live
    writer and nothing is removed.
    """
    try:
        with build_lock(root):
            leftovers = [*root.glob(f"{STAGING_PREFIX}*"), *root.glob(".*.tmp-*")]
            removed = [p for p in leftovers if p not in _live_staging]
            for p in removed:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                logger.info("removed leftover %s", p.name)
            return removed
    except LockedError:
        logger.info("%s: a writer holds the lock; its leftovers are its own", root)
        return []


def set_current(root: Path, version: str) -> None:
    """Atomically point ``current`` at an existing version."""
    check_version_id(version)
    if not (root / VERSIONS / version / MANIFEST).is_file():
        raise ArtifactError(f"version {version} does not exist under {root}")
    _write_atomic(root / CURRENT, (version + "\n").encode())
    _fsync(root)


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current one); returns deleted ids."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    current = current_version(root)
    versions = version_ids(root)
    doomed = [v for v in versions[:-keep] if v != current]
    for v in doomed:
        # Out of versions/ first (one atomic rename), so a kill mid-delete leaves a staging
        # leftover that the next build removes, never a half-deleted version.
        trash = root / f"{STAGING_PREFIX}{v}-{os.getpid()}"
        os.rename(root / VERSIONS / v, trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("pruned old version %s", v)
    return doomed


# ---------------------------------------------------------------- reading


def version_ids(root: Path) -> list[str]:
    """Published version ids under ``root``, oldest first."""
    d = root / VERSIONS
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if VERSION_RE.match(p.name) and p.is_dir())


def current_version(root: Path) -> str | None:
    """The version ``current`` points at, or ``None`` when nothing is published yet."""
    try:
        text = (root / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{root / CURRENT}: unreadable ({exc})") from exc
    return check_version_id(text)


def read_manifest(root: Path, version: str) -> Manifest:
    """Parse and validate one version's manifest."""
    path = root / VERSIONS / check_version_id(version) / MANIFEST
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise ArtifactError(f"version {version}: no manifest") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"version {version}: manifest does not parse ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format_version") not in READABLE_FORMATS:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise ArtifactError(
            f"version {version}: format version {found!r}, this build reads {list(READABLE_FORMATS)}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"version {version}: invalid manifest: {exc}") from exc
    if manifest.version != version:
        raise ArtifactError(f"version {version}: its manifest says it is {manifest.version}")
    if (manifest.format_version == DELTA_FORMAT_VERSION) != (manifest.delta is not None):
        # format 2 is exactly a delta version: one without its delta (or a format 1 with one) is damaged
        raise ArtifactError(
            f"version {version}: format version {manifest.format_version} "
            f"{'without' if manifest.delta is None else 'with'} a delta"
        )
    return manifest


def version_dir(root: Path, version: str) -> Path:
    """The directory of one published version under ``root``."""
    return root / VERSIONS / check_version_id(version)


def copy_version(root: Path, version: str, dest: Path, *, check: bool = True) -> Manifest:
    """Copy every file of ``version`` into the new directory ``dest``, verifying as it copies.

    With ``check`` each file's SHA-256 is computed from the bytes being copied (no second read)
    and compared with the manifest; sizes are always compared. Files are fsynced. Raises
    :class:`ArtifactError` naming every damaged file; ``dest`` is then incomplete, and the
    caller removes it. Memory: one 4 MiB buffer (the data passes through the page cache).
    """
    manifest = read_manifest(root, version)
    base = version_dir(root, version)
    dest.mkdir()
    problems = []
    for name, entry in [*manifest.files.items(), (MANIFEST, None)]:
        try:
            size, digest = _copy_file(base / name, dest / name, check and entry is not None)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc})")
            continue
        if entry is None:
            continue
        if size != entry.bytes:
            problems.append(f"{name}: {size} bytes, manifest says {entry.bytes}")
        elif check and digest != entry.sha256:
            problems.append(f"{name}: checksum mismatch")
    if problems:
        raise ArtifactError(f"version {version} is damaged: {'; '.join(problems)}")
    if (dest / MANIFEST).read_bytes() != manifest_bytes(root, version):
        raise ArtifactError(f"version {version}: its manifest changed while it was copied")
    _fsync(dest)
    return manifest


def manifest_bytes(root: Path, version: str) -> bytes:
    """The raw manifest file of ``version`` (to tell whether two copies are the same version)."""
    try:
        return (version_dir(root, version) / MANIFEST).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"version {version}: no readable manifest ({exc})") from exc


def _copy_file(src: Path, dst: Path, digest: bool) -> tuple[int, str | None]:
    h = hashlib.sha256() if digest else None
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    size = 0
    with src.open("rb", buffering=0) as fin, dst.open("xb", buffering=0) as fout:
        while n := fin.readinto(buf):
            if h is not None:
                h.update(view[:n])
            done = 0
            while done < n:  # an unbuffered write may be short
                done += fout.write(view[done:n])
            size += n
        os.fsync(fout.fileno())
        if hasattr(os, "posix_fadvise"):  # the shared file's pages are not needed again
            os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return size, h.hexdigest() if h is not None else None


def verify(root: Path, version: str | None = None) -> list[str]:
    """Recompute every file's checksum; returns the problems found (empty when intact)."""
    version = version or current_version(root)
    if version is None:
        raise ArtifactError(f"{root}: nothing published")
    manifest = read_manifest(root, version)
    base = root / VERSIONS / version
    problems = []
    for name, entry in manifest.files.items():
        p = base / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry.bytes:
            problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {entry.bytes}")
        elif _sha256(p) != entry.sha256:
            problems.append(f"{name}: checksum mismatch")
    return problems


def rollback(root: Path, version: str | None = None) -> str:
    """Make ``version`` (default: the one published before the current) current again.

    Holds :func:`build_lock`, so it never races a build's publish or prune.
    """
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such index root")
    with build_lock(root):
        current = current_version(root)
        versions = version_ids(root)
        if version is None:
            older = [v for v in versions if current is None or v < current]
            if not older:
                raise ArtifactError(f"{root}: no version older than {current} to roll back to")
            version = older[-1]
        if check_version_id(version) not in versions:
            raise ArtifactError(f"{root}: no version {version!r}")
        problems = verify(root, version)
        if problems:
            raise ArtifactError(f"version {version} is damaged: {'; '.join(problems)}")
        set_current(root, version)
        return version


@dataclass
class Level:
    """One level's normalised rows, norms and optional approximate index (for query expansion)."""

    rows: np.ndarray
    norms: np.ndarray
    index: Any
    entry: LevelEntry


@dataclass
class Artifact:
    """A loaded, validated version: everything the searcher needs."""

    root: Path
    manifest: Manifest
    levels: list[Level]
    serving_index: Any
    ids: np.ndarray | None
    metadata: dict[str, np.ndarray]

    @property
    def version(self) -> str:
        return self.manifest.version


def load(root: Path, version: str | None = None, *, check: bool = True, mmap: bool = True) -> Artifact:
    """Load a version (default: current), verifying checksums and shapes unless ``check=False``."""
    version = version or current_version(root)
    if version is None:
        raise ArtifactError(f"{root}: nothing published yet")
    manifest = read_manifest(root, version)
    base = root / VERSIONS / version
    if check:
        problems = verify(root, version)
        if problems:
            raise ArtifactError(f"version {version} is damaged: {'; '.join(problems)}")
    mode: Literal["r"] | None = "r" if mmap else None
    if manifest.delta is not None:
        return _load_delta(root, manifest, base, mode)
    n, d = manifest.n, manifest.d
    levels = []
    for entry in manifest.levels:
        rows = _load_npy(base / entry.rows, mode, (n, d), np.dtype(entry.dtype))
        norms = _load_npy(base / entry.norms, mode, (n,), np.float32)
        index = (
            _read_index(base / entry.index, n, d, mmap, entry.ivfdata is not None) if entry.index else None
        )
        levels.append(Level(rows, norms, index, entry))
    if len(levels) != manifest.qe_times:
        raise ArtifactError(f"version {version}: {len(levels)} levels for qe_times {manifest.qe_times}")
    serving = _read_index(
        base / manifest.serving_index.file, n, d, mmap, bool(manifest.serving_index.ivfdata)
    )
    ids = _load_npy(base / manifest.ids_file, mode, (n,), None) if manifest.ids_file else None
    metadata = {c.name: _load_npy(base / c.file, mode, (n,), None) for c in manifest.metadata}
    return Artifact(root, manifest, levels, serving, ids, metadata)


def _save_npy(path: Path, arr: np.ndarray, dtype: np.dtype) -> None:
    """Write ``arr`` as a ``dtype`` .npy at ``path``, in blocks; flush only if it is mapped there."""
    if isinstance(arr, np.memmap) and arr.filename and Path(arr.filename) == path.resolve():
        if arr.dtype != dtype:
            raise ArtifactError(f"{path.name}: mapped as {arr.dtype}, the manifest says {dtype}")
        arr.flush()
        return
    if not isinstance(arr, np.memmap) and arr.dtype == dtype:
        np.save(path, np.ascontiguousarray(arr))
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=arr.shape)
    for lo in range(0, arr.shape[0], WRITE_BLOCK):
        out[lo : lo + WRITE_BLOCK] = arr[lo : lo + WRITE_BLOCK]
    out.flush()
    del out


def _load_delta(root: Path, manifest: Manifest, base: Path, mode: Literal["r"] | None) -> Artifact:
    """A format-2 version as a full build would present it (compacted; see the module docstring)."""
    dl = manifest.delta
    assert dl is not None
    n, d, nb = manifest.n, manifest.d, dl.base_n
    dead = _load_npy(base / dl.dead, None, None, np.int64)
    view = delta.View(nb, dead, dl.appended)
    if view.n != n:
        raise ArtifactError(f"version {manifest.version}: delta makes {view.n} rows, manifest says {n}")
    over = {lv.level: lv for lv in dl.levels}
    if sorted(over) != list(range(manifest.qe_times + 1)):
        raise ArtifactError(f"version {manifest.version}: delta levels {sorted(over)}")

    def overrides(t: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        lv = over[t]
        pos = _load_npy(base / lv.pos, None, None, np.int64)
        rows = _load_npy(base / lv.rows, None, (len(pos), d), dtype)
        norms = _load_npy(base / lv.norms, None, (len(pos),), np.float32) if lv.norms else None
        return pos, rows, norms

    mmap = mode is not None
    levels = []
    for entry in manifest.levels:
        dtype = np.dtype(entry.dtype)
        pos, rows, norms = overrides(entry.level, dtype)
        if norms is None:
            raise ArtifactError(f"version {manifest.version}: delta level {entry.level} has no norms")
        base_rows = _load_npy(base / entry.rows, mode, (nb, d), dtype)
        base_norms = _load_npy(base / entry.norms, mode, (nb,), np.float32)
        index = None
        if entry.index:  # the base's index, hard-linked, masked and overlaid (aqe_retrieval.overlay)
            base_index = _read_index(base / entry.index, nb, d, mmap, entry.ivfdata is not None)
            index = overlay.DeltaIndex(base_index, view, pos, rows, entry.nprobe, entry.ef_search)
        levels.append(
            Level(view.apply(base_rows, pos, rows), view.apply(base_norms, pos, norms), index, entry)
        )
    s = manifest.serving_index
    pos, rows, _ = overrides(manifest.qe_times, np.dtype(np.float32))
    served = _read_index(base / s.file, nb, d, mmap, bool(s.ivfdata))
    serving: Any
    if isinstance(served, faiss.IndexFlat):  # exact: one flat index over the view (BLAS search)
        serving = faiss.IndexFlatIP(d)
        serving.add(view.apply(served.reconstruct_n(0, nb), pos, rows))
    else:
        serving = overlay.DeltaIndex(served, view, pos, rows, s.nprobe, s.ef_search)
    ids = None
    if manifest.ids_file:
        if dl.ids is None:
            raise ArtifactError(f"version {manifest.version}: the delta has no ids for its appended rows")
        extra = _load_npy(base / dl.ids, None, (dl.appended,), None)
        ids = view.append(_load_npy(base / manifest.ids_file, mode, (nb,), None), extra)
    metadata = {
        c.name: view.append(
            _load_npy(base / c.file, mode, (nb,), None), _load_npy(base / f, None, (dl.appended,), None)
        )
        for c, f in zip(manifest.metadata, dl.metadata, strict=True)
    }
    return Artifact(root, manifest, levels, serving, ids, metadata)


def load_graphs(art: Artifact) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The stored top-k graph of every level, in the version's own row numbering; None if absent."""
    m = art.manifest
    if len(m.graphs) != m.qe_times:
        return None
    base = version_dir(art.root, m.version)
    k = m.effective_qe_k
    nb = m.delta.base_n if m.delta else m.n
    out = []
    for g in m.graphs:
        ids = _load_npy(base / g.ids, "r", (nb, k), np.int64)
        sims = _load_npy(base / g.sims, "r", (nb, k), np.float32)
        if m.delta is not None:
            dg = next(x for x in m.delta.graphs if x.level == g.level)
            view = delta.View(nb, _load_npy(base / m.delta.dead, None, None, np.int64), m.delta.appended)
            pos = _load_npy(base / dg.pos, None, None, np.int64)
            ids = view.apply(view.renumber(ids), pos, _load_npy(base / dg.ids, None, (len(pos), k), np.int64))
            sims = view.apply(sims, pos, _load_npy(base / dg.sims, None, (len(pos), k), np.float32))
        out.append((ids, sims))
    return out


def delta_dead(art: Artifact) -> np.ndarray:
    """The base rows a delta version deleted (sorted int64); empty for a full build."""
    m = art.manifest
    if m.delta is None:
        return np.empty(0, np.int64)
    return _load_npy(version_dir(art.root, m.version) / m.delta.dead, None, None, np.int64)


def delta_served_rows(art: Artifact) -> tuple[np.ndarray, np.ndarray]:
    """The served rows a delta version stores: (view positions, rows (len, d) float32).

    Empty for a full build. Only these of the served level are ever rewritten by the next
    add/delete (the rows it re-expands are computed afresh), so the base's serving index is
    never read back: SQ8/PQ codes cannot reconstruct a row exactly.
    """
    m = art.manifest
    if m.delta is None:
        return np.empty(0, np.int64), np.empty((0, m.d), np.float32)
    base = version_dir(art.root, m.version)
    lv = next(x for x in m.delta.levels if x.level == m.qe_times)
    pos = _load_npy(base / lv.pos, None, None, np.int64)
    return pos, _load_npy(base / lv.rows, None, (len(pos), m.d), np.float32)


def delta_positions(art: Artifact) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Positions a delta version overrides: per level 0 .. qe_times, and per graph level."""
    m = art.manifest
    if m.delta is None:
        empty = np.empty(0, np.int64)
        return [empty] * (m.qe_times + 1), [empty] * m.qe_times
    base = version_dir(art.root, m.version)
    levels = [
        _load_npy(base / lv.pos, None, None, np.int64) for lv in sorted(m.delta.levels, key=lambda e: e.level)
    ]
    graphs = [
        _load_npy(base / g.pos, None, None, np.int64) for g in sorted(m.delta.graphs, key=lambda e: e.level)
    ]
    return levels, graphs


def _load_npy(path: Path, mode: Literal["r"] | None, shape: tuple[int, ...] | None, dtype: Any) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"{path.name}: unreadable ({exc})") from exc
    if (shape is not None and arr.shape != shape) or (dtype is not None and arr.dtype != dtype):
        raise ArtifactError(f"{path.name}: {arr.dtype} {arr.shape}, expected {shape}")
    return arr


def _read_index(path: Path, n: int, d: int, mmap: bool = False, ondisk: bool = False) -> Any:
    # IO_FLAG_MMAP_IFC maps flat codes (IndexFlat, HNSW storage) and, with faiss-cpu 1.15, the
    # inverted lists of IVF indexes from the file instead of copying them (measured: reading a
    # 197 MiB IVF256,Flat grew RSS 4.6 MiB, against 189 MiB without): worker processes share one
    # copy through the page cache.
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    if ondisk:
        # On-disk lists (OnDiskInvertedLists) name their .ivfdata file by the path it was built
        # at; SAME_DIR looks for it beside the index instead (the version was renamed since),
        # and FAISS maps it itself (read-only). SAME_DIR needs a file reader, so no MMAP_IFC.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        if ondisk:
            with native_stdout_to_stderr():  # FAISS prints a line there on every such load
                index = faiss.read_index(str(path), flags)
        else:
            index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise ArtifactError(f"{path.name}: FAISS cannot read it ({exc})") from exc
    if index.ntotal != n or index.d != d:
        raise ArtifactError(f"{path.name}: {index.ntotal} x {index.d}, expected {n} x {d}")
    return index


def software_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the artifact depends on."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("aqe-retrieval")
    except PackageNotFoundError:
        own = "source"
    return {"faiss": faiss.__version__, "numpy": np.__version__, "aqe-retrieval": own}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ChangeRecord:
    """One logged ``add``/``delete``: its order number, fingerprint and files (:func:`record_change`)."""

    order: int
    kind: str  # "add" or "delete"
    operation: str
    path: Path
    count: int

    @property
    def rows(self) -> Path:
        """The added raw rows, float32 ``.npy`` (add only)."""
        return self.path / "rows.npy"

    def added_ids(self) -> list[str]:
        """The added rows' ids (``[]`` without ids or rows)."""
        return _read_lines(self.path / "ids.txt")

    def deleted_ids(self) -> list[str]:
        """The ids this change deleted (applied before its added rows)."""
        return _read_lines(self.path / "deleted.txt")

    def metadata(self) -> dict[str, np.ndarray]:
        """The added rows' metadata columns (add only), in the version's column order."""
        meta = json.loads((self.path / "change.json").read_text(encoding="utf-8"))
        return {
            name: np.load(self.path / f"meta_{i}.npy", allow_pickle=False)
            for i, name in enumerate(meta.get("metadata", []))
        }


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


_CHANGE_DIR = re.compile(r"^[0-9]{8}$")


def changes_dir(root: Path) -> Path:
    """``ROOT/changes/``: the change log ``build`` and ``nightly`` apply on top of ``--gallery``."""
    return root / CHANGES


def list_changes(root: Path) -> list[ChangeRecord]:
    """The logged changes not cleared yet, in order."""
    base = changes_dir(root)
    if not base.is_dir():
        return []
    out, cleared = [], _cleared_through(root)
    for p in sorted(base.iterdir()):
        if not _CHANGE_DIR.match(p.name) or int(p.name) <= cleared:
            continue
        try:
            meta = json.loads((p / "change.json").read_text(encoding="utf-8"))
            out.append(ChangeRecord(int(p.name), meta["kind"], meta["operation"], p, int(meta["count"])))
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{p}: unreadable change record ({exc})") from exc
    return out


def _cleared_through(root: Path) -> int:
    try:
        return int((changes_dir(root) / "cleared_through").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{changes_dir(root)}/cleared_through: unreadable ({exc})") from exc


def record_change(
    root: Path,
    operation: str,
    *,
    rows: np.ndarray | None = None,
    ids: list[str] | None = None,
    metadata: dict[str, np.ndarray] | None = None,
    delete: list[str] | None = None,
) -> ChangeRecord:
    """Log one change, immutably: ``delete`` (ids, applied first) and/or added ``rows`` (raw float32).

    Written into a temporary directory, every file fsynced, renamed to ``changes/NNNNNNNN``
    (the next order number, never reused even after :func:`clear_changes`), the directory
    fsynced: a record is whole or absent. The caller holds the build lock and publishes the
    version only after this returns. A retry of the latest record's operation (its publish
    failed) reuses that record.
    """
    base = changes_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    existing = list_changes(root)
    if existing and existing[-1].operation == operation:
        return existing[-1]
    order = max([_cleared_through(root), *(r.order for r in existing)]) + 1
    kind = "add" if rows is not None and len(rows) else "delete"
    tmp = base / f".tmp-{order:08d}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        record: dict[str, Any] = {"order": order, "kind": kind, "operation": operation}
        count = 0
        if rows is not None and len(rows):
            np.save(tmp / "rows.npy", np.ascontiguousarray(rows, dtype=np.float32), allow_pickle=False)
            (tmp / "ids.txt").write_text("".join(f"{i}\n" for i in ids or []), encoding="utf-8")
            for i, values in enumerate((metadata or {}).values()):
                np.save(tmp / f"meta_{i}.npy", np.asarray(values), allow_pickle=False)
            record["metadata"] = list(metadata or {})
            count += len(rows)
        (tmp / "deleted.txt").write_text("".join(f"{i}\n" for i in delete or []), encoding="utf-8")
        record["count"] = count + len(delete or [])
        (tmp / "change.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        final = base / f"{order:08d}"
        os.rename(tmp, final)
        _fsync(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ChangeRecord(order, kind, operation, final, record["count"])


def clear_changes(root: Path, through: int) -> list[int]:
    """Remove the records up to order ``through`` (the upstream gallery holds them); under the lock."""
    with build_lock(root):
        gone = [r for r in list_changes(root) if r.order <= through]
        if not gone and not changes_dir(root).is_dir():
            return []
        changes_dir(root).mkdir(parents=True, exist_ok=True)
        mark = max(through, _cleared_through(root))
        _write_atomic(changes_dir(root) / "cleared_through", f"{mark}\n".encode())
        for r in gone:
            shutil.rmtree(r.path)
        _fsync(changes_dir(root))
        return [r.order for r in gone]
