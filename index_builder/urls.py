"""Gallery inputs at fsspec URLs (``s3://``, ``gs://``, ``file://``, ...): located, listed, read by range.

A ``--gallery`` that starts with ``PROTOCOL://`` is a :class:`Url`; anything else stays a
local path. A URL is resolved by fsspec (``fsspec.core.url_to_fs``) in the process that reads
it, so cluster workers read their own row ranges straight from the store: a ``.npy`` file by
its header and byte ranges (:class:`UrlNpyShard`), a Parquet file row group by row group
through pyarrow over the fsspec file (:mod:`index_builder.parquet_shards`). A URL can name one
file or a directory of shards, as a local path can; ``.npy`` sidecars (ids, metadata) are not
read from URLs (give ``--ids`` / ``--metadata``). A protocol whose filesystem package is not
installed is an :class:`~aqe_retrieval.errors.InputError` naming the package (exit 2).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from aqe_retrieval.errors import InputError

URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
VERSION_FIELDS = (
    "ETag",
    "etag",
    "VersionId",
    "generation",
    "md5Hash",
    "crc32c",
    "checksum",
    "mtime",
    "LastModified",
    "last_modified",
    "updated",
)
"""``fs.info()`` fields that change when a file's content does, as fsspec filesystems name them
(s3fs: ETag, LastModified, VersionId; gcsfs: etag, generation, md5Hash, crc32c, updated; local
and sftp: mtime): whichever of them a filesystem gives."""


def location(text: str | Path) -> Path | Url:
    """A :class:`Url` for ``PROTOCOL://...`` text, else a local :class:`~pathlib.Path`."""
    return Url(text) if isinstance(text, str) and is_url(text) else Path(text)


def is_url(text: str) -> bool:
    """Whether ``text`` starts with ``PROTOCOL://``."""
    return bool(URL_RE.match(text))


@dataclass(frozen=True)
class Url:
    """An fsspec URL with the few path operations the input readers use; pickles as its text."""

    url: str

    def __str__(self) -> str:
        return self.url

    @property
    def protocol(self) -> str:
        """The scheme before ``://``."""
        m = URL_RE.match(self.url)
        assert m is not None, self.url
        return m.group(1)

    @property
    def name(self) -> str:
        """The last path component."""
        return posixpath.basename(self.url.rstrip("/"))

    @property
    def suffix(self) -> str:
        """The last component's extension (``.npy``), or ``""``."""
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        """The last component without its extension."""
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> Url:
        """The URL of the containing directory."""
        return Url(self.url.rstrip("/").rsplit("/", 1)[0])

    def child(self, name: str) -> Url:
        """The URL of ``name`` inside this directory."""
        return Url(f"{self.url.rstrip('/')}/{name}")

    def filesystem(self) -> tuple[Any, str]:
        """``(fsspec filesystem, path within it)``; InputError naming a missing package."""
        try:
            import fsspec.core
        except ImportError as exc:  # comes with dask; a bare install may lack it
            raise InputError(f"{self}: reading URLs needs fsspec (pip install fsspec)") from exc
        try:
            return fsspec.core.url_to_fs(self.url)
        except ImportError as exc:  # a known protocol whose package is missing: fsspec names it
            raise InputError(f"{self}: protocol {self.protocol!r} is not available here: {exc}") from exc
        except ValueError as exc:
            raise InputError(
                f"{self}: no fsspec filesystem for protocol {self.protocol!r} ({exc}); install the "
                "package that implements it (s3fs for s3://, gcsfs for gs://, adlfs for abfs://)"
            ) from exc

    def version(self) -> str | None:
        """What names this file's content without reading it: its size and the store's version fields.

        ``fs.info()``'s ETag, version id, generation, checksum or modification time, those the
        filesystem gives (:data:`VERSION_FIELDS`); None where it gives none of them.
        """
        fs, path = self.filesystem()
        try:
            info = fs.info(path)
        except OSError as exc:
            raise InputError(f"{self}: cannot stat ({exc})") from exc
        fields = {k: str(info[k]) for k in VERSION_FIELDS if info.get(k) is not None}
        return json.dumps({"size": info.get("size"), **fields}, sort_keys=True) if fields else None

    def open(self, mode: str = "rb") -> IO[bytes]:
        """The file, opened through fsspec."""
        fs, path = self.filesystem()
        try:
            return fs.open(path, mode)
        except OSError as exc:
            raise InputError(f"{self}: cannot open ({exc})") from exc

    def exists(self) -> bool:
        """Whether the URL names a file or a directory."""
        fs, path = self.filesystem()
        return bool(fs.exists(path))

    def is_dir(self) -> bool:
        """Whether the URL names a directory (or a prefix holding objects)."""
        fs, path = self.filesystem()
        return bool(fs.isdir(path))

    def is_file(self) -> bool:
        """Whether the URL names a file."""
        fs, path = self.filesystem()
        return bool(fs.isfile(path))

    def files(self) -> list[Url]:
        """The files directly inside this directory, in name order."""
        fs, path = self.filesystem()
        entries = fs.ls(path, detail=True)
        names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "file")
        return [self.child(name) for name in names]


Location = Path | Url
"""Where an input file lives: a local path or an fsspec URL."""


@dataclass(frozen=True)
class UrlNpyShard:
    """One ``.npy`` file at a URL: its header parsed, rows read as byte ranges of the data."""

    path: Url
    shape: tuple[int, int]
    dtype: np.dtype
    offset: int

    @property
    def rows(self) -> int:
        """Rows of this shard."""
        return self.shape[0]

    @property
    def d(self) -> int:
        """Dimension of every row."""
        return self.shape[1]

    @property
    def files(self) -> tuple[Url, ...]:
        """The one file read."""
        return (self.path,)

    has_ids = False
    has_metadata = False

    def _read(self, f: IO[bytes], lo: int, hi: int) -> np.ndarray:
        row = self.d * self.dtype.itemsize
        f.seek(self.offset + lo * row)
        data = f.read((hi - lo) * row)
        if len(data) != (hi - lo) * row:
            raise InputError(f"{self.path}: truncated: rows {lo}..{hi - 1} end past the file")
        return np.frombuffer(data, dtype=self.dtype).reshape(hi - lo, self.d).astype(np.float32)

    def blocks(self, block_size: int) -> Iterator[np.ndarray]:
        """Consecutive (<= block_size, d) float32 blocks, each one ranged read."""
        with self.path.open() as f:
            for lo in range(0, self.rows, block_size):
                yield self._read(f, lo, min(self.rows, lo + block_size))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted, numbered within this shard) as float32: one read per run of rows."""
        out = np.empty((len(rows), self.d), dtype=np.float32)
        if not len(rows):
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        with self.path.open() as f:
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
                out[a:b] = self._read(f, int(rows[a]), int(rows[b - 1]) + 1)
        return out

    def ids(self) -> list[str]:
        """None carried: sidecars are not read from URLs."""
        raise InputError(f"{self.path}: no ids sidecar is read from a URL (give --ids)")

    def metadata(self) -> dict[str, np.ndarray]:
        """None carried: sidecars are not read from URLs."""
        raise InputError(f"{self.path}: no metadata sidecar is read from a URL (give --metadata)")


def open_npy_url(url: Url) -> UrlNpyShard:
    """Parse the ``.npy`` header at ``url`` (a 2-D C-order array) without reading its rows."""
    with url.open() as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = read_header(f)
        except ValueError as exc:
            raise InputError(f"{url}: not a readable .npy array ({exc})") from exc
        offset = f.tell()
    from index_builder.npy_shards import ACCEPTED_DTYPES  # the checks of a local .npy

    if len(shape) != 2:
        raise InputError(f"{url}: expected a 2-D (rows, dim) array, got shape {shape}")
    if np.dtype(dtype) not in ACCEPTED_DTYPES:
        raise InputError(f"{url}: dtype {dtype} is not accepted (float32 or float16)")
    if shape[1] == 0:
        raise InputError(f"{url}: dimension is 0")
    if fortran and shape[1] > 1:
        raise InputError(f"{url}: a Fortran-order array cannot be read by rows (save it C-order)")
    return UrlNpyShard(url, (int(shape[0]), int(shape[1])), np.dtype(dtype), offset)
