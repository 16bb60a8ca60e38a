"""The private, node-local copy of a served version: what the service memory-maps.

Pages of a memory-mapped file that is then truncated (what an overwrite in place does; on a
shared NFS volume, a prune from another host looks the same) raise SIGBUS when touched: the
service dies with no log line. So the service maps a private copy in a directory that only it
writes (``AQE_LOCAL_COPY_DIR``): truncation, replacement or deletion of the shared files cannot
reach the mapped pages. Deleting a file that is mapped is harmless (the inode lives until it is
unmapped), so old copies are removed even while a worker still serves one.

::

    LOCAL/                          created 0700; must belong to the service's user
      versions/<version>/           a complete, verified copy (the layout of an index root)
      .copy-<version>-<pid>-<hex>/  a copy being written (renamed into versions/ when complete)
      .lock                         flock held while copying, reusing, opening and cleaning

:func:`load` takes the lock (blocking: the workers of one node wait for the one that copies,
then reuse its copy), reuses ``versions/<version>`` if its manifest is byte for byte the shared
one and every file has its manifest size, else copies every file into a temporary directory,
computing SHA-256 from the bytes being copied (verification costs no extra read), and renames
it into place; opens it (memory-mapped); removes every other copy but ``keep`` and every
temporary directory (under the lock nothing else writes there); releases the lock.

Cost: one more copy of the served version on the node's local disk, and a second one during a
switch until the old one is removed (its disk space returns when the last worker that maps it
lets go). Time, measured on the development machine (2 shared cores, local disk, source not
in the page cache): copy + SHA-256 + fsync 1.9 to 3.2 s/GB, of which SHA-256 is 0.6 s/GB (the
in-place load reads and hashes the files anyway) and the copy alone 1.1 s/GB; a source on NFS
adds its read time. Resident memory stays page cache (one
4 MiB buffer of anonymous memory), so LOCAL must be a disk, not a tmpfs, whose pages would be
shared memory instead (the service checks with :func:`memory_backed` and then serves in place).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aqe_retrieval import artifact
from aqe_retrieval.artifact import Artifact
from aqe_retrieval.errors import ArtifactError

logger = logging.getLogger(__name__)

LOCK = ".lock"
COPY_PREFIX = ".copy-"


def load(root: Path, version: str, local: Path, *, check: bool = True, keep: Iterable[str] = ()) -> Artifact:
    """Version ``version`` of ``root`` loaded (memory-mapped) from its private copy under ``local``."""
    with _locked(local):
        ensure_copy(root, version, local, check=check, locked=True)
        art = artifact.load(local, version, check=False, mmap=True)
        _remove_others(local, {version, *keep})
    return art


def ensure_copy(root: Path, version: str, local: Path, *, check: bool = True, locked: bool = False) -> bool:
    """Make ``local/versions/<version>`` a complete copy; True if it was copied, False if reused."""
    if not locked:
        with _locked(local):
            return ensure_copy(root, version, local, check=check, locked=True)
    final = artifact.version_dir(local, version)
    if _complete(root, version, final):
        logger.info("version %s: reusing the local copy in %s", version, local)
        return False
    manifest = artifact.read_manifest(root, version)
    need = sum(f.bytes for f in manifest.files.values())
    free = shutil.disk_usage(local).free
    if need > free:
        raise ArtifactError(f"version {version}: {need} bytes to copy, {free} free in {local}")
    tmp = local / f"{COPY_PREFIX}{version}-{os.getpid()}-{secrets.token_hex(3)}"
    t0 = time.perf_counter()
    try:
        artifact.copy_version(root, version, tmp, check=check)
        if final.exists():  # an incomplete or stale copy of the same id
            shutil.rmtree(final)
        final.parent.mkdir(exist_ok=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    logger.info(
        "version %s: copied %.1f MB into %s in %.1fs%s",
        version,
        need / 1e6,
        local,
        seconds,
        " (checksums verified)" if check else "",
    )
    return True


def memory_backed(local: Path, mounts: Path = Path("/proc/self/mounts")) -> bool:
    """Whether ``local`` lies on a tmpfs or ramfs, where a copy would be held in memory.

    The mount with the longest mount point above ``local`` decides; False where ``mounts``
    cannot be read (not Linux).
    """
    try:
        table = mounts.read_text().splitlines()
    except OSError:
        return False
    path = local.absolute()
    best, fstype = -1, ""
    for line in table:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        # >=: of two mounts on one point, the later one is on top
        if (path == point or point in path.parents) and len(point.parts) >= best:
            best, fstype = len(point.parts), fields[2]
    return fstype in ("tmpfs", "ramfs")


def remove_others(local: Path, keep: Iterable[str]) -> list[str]:
    """Remove every copy under ``local`` but those of ``keep``; returns the versions removed."""
    with _locked(local):
        return _remove_others(local, set(keep))


def _remove_others(local: Path, keep: set[str]) -> list[str]:
    removed = []
    for p in local.glob(f"{COPY_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)  # under the lock, nobody is writing it
    for v in artifact.version_ids(local):
        if v not in keep:
            shutil.rmtree(artifact.version_dir(local, v), ignore_errors=True)
            removed.append(v)
            logger.info("removed the local copy of version %s", v)
    return removed


def _complete(root: Path, version: str, final: Path) -> bool:
    if not final.is_dir():
        return False
    try:
        if (final / artifact.MANIFEST).read_bytes() != artifact.manifest_bytes(root, version):
            return False
        files = artifact.read_manifest(final.parent.parent, version).files
    except (OSError, ArtifactError):
        return False
    return all(
        (final / name).is_file() and (final / name).stat().st_size == f.bytes for name, f in files.items()
    )


@contextmanager
def _locked(local: Path) -> Iterator[None]:
    _private_dir(local)
    fd = os.open(local / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: wait for the worker that is copying
        yield
    finally:
        os.close(fd)


def _private_dir(local: Path) -> None:
    """Create ``local`` (0700) or check that an existing one belongs to this user alone."""
    try:
        local.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = local.stat()
    except OSError as exc:
        raise ArtifactError(f"local copy directory {local}: {exc}") from exc
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ArtifactError(
            f"local copy directory {local} belongs to uid {st.st_uid} with mode "
            f"{st.st_mode & 0o777:o}: it must be this service's own (uid {os.geteuid()}, not "
            "writable by others), since the service loads indexes from it"
        )
