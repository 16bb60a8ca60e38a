"""Reading and validating the builder's input: embeddings, external ids and metadata.

Embeddings are one ``.npy`` or Parquet file, or a directory of ``.npy`` or Parquet shards
(concatenated in file-name order), float32 or float16, read in blocks: never held whole in
memory here. ``.npy`` shards are memory-mapped (:mod:`index_builder.npy_shards`); Parquet
shards are read one row group at a time (:mod:`index_builder.parquet_shards`). Each input may
be a local path or an fsspec URL (``s3://...``, :mod:`index_builder.urls`): the same readers,
a URL's ``.npy`` read by byte ranges.

Ids and metadata come with the shards or from whole-gallery files (``--ids``, ``--metadata``),
never both: a Parquet shard carries them in its id column and other columns, a ``.npy`` shard
in sidecar files. Every problem raises :class:`InputError` naming the file and the offending
rows.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from aqe_retrieval.errors import InputError
from index_builder.id_metadata import join_ids, join_metadata, name_rows, read_ids, read_metadata
from index_builder.npy_shards import IDS_SIDECAR, METADATA_SIDECAR, NpyShard, check_array, open_npy
from index_builder.urls import Location, Url, location, open_npy_url

logger = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class ParquetColumns:
    """Which Parquet columns hold what; ``None`` picks the default.

    ``embedding``: default the only list column, else ``embedding``. ``id``: default ``id`` if
    present; ``""``: no ids from the input. ``metadata``: default every other int, float or
    string column (others are skipped with a log line); named, each must exist and have one of
    those types; ``()``: none.
    """

    embedding: str | None = None
    id: str | None = None
    metadata: tuple[str, ...] | None = None

    @property
    def chosen(self) -> bool:
        """Whether any column was named (then the input must be Parquet)."""
        return self != ParquetColumns()


class Shard(Protocol):
    """One file of the gallery: its rows in blocks, and the ids and metadata it carries."""

    @property
    def path(self) -> Location: ...
    @property
    def rows(self) -> int: ...
    @property
    def d(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def files(self) -> tuple[Location, ...]: ...
    @property
    def has_ids(self) -> bool: ...
    @property
    def has_metadata(self) -> bool: ...
    def blocks(self, block_size: int) -> Iterator[np.ndarray]: ...
    def take(self, rows: np.ndarray) -> np.ndarray: ...
    def ids(self) -> list[str]: ...
    def metadata(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class EmbeddingSource:
    """A read-only (n, d) float matrix over one or more shards (``.npy`` or Parquet), in order.

    ``columns``: the Parquet columns read (defaults resolved), ``None`` for ``.npy``.
    """

    shards: tuple[Shard, ...]
    columns: ParquetColumns | None = None

    @property
    def paths(self) -> tuple[Location, ...]:
        """The shards' embedding files."""
        return tuple(s.path for s in self.shards)

    @property
    def files(self) -> tuple[Location, ...]:
        """Every file the source reads: shards and their sidecars (what the fingerprint covers)."""
        return tuple(f for s in self.shards for f in s.files)

    @property
    def label(self) -> str:
        """The file, or the shards' directory, for messages."""
        return str(self.paths[0] if len(self.shards) == 1 else self.paths[0].parent)

    @property
    def n(self) -> int:
        """Rows over all shards."""
        return sum(s.rows for s in self.shards)

    @property
    def d(self) -> int:
        """Dimension of every row."""
        return self.shards[0].d

    @property
    def dtype(self) -> np.dtype:
        """The rows' stored dtype (float32 or float16)."""
        return self.shards[0].dtype

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)`` with ``block`` (<= block_size, d) float32, in row order.

        A block never spans two shards. Memory: the block, plus one row group for Parquet.
        """
        start = 0
        for shard in self.shards:
            lo = start
            for block in shard.blocks(block_size):
                yield lo, block
                lo += len(block)
                del block  # else it outlives the consumer's copy while the next block is read
            start += shard.rows

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted row numbers) as a (len(rows), d) float32 array."""
        out = np.empty((len(rows), self.d), dtype=np.float32)
        start = 0
        for shard in self.shards:
            mine = (rows >= start) & (rows < start + shard.rows)
            if mine.any():
                out[mine] = shard.take(rows[mine] - start)
            start += shard.rows
        return out

    def concat(self, other: EmbeddingSource) -> EmbeddingSource:
        """This source's rows followed by ``other``'s (same d; dtypes may differ)."""
        if other.d != self.d:
            raise InputError(f"{other.paths[0]}: dimension {other.d} differs from {self.paths[0]}'s {self.d}")
        return EmbeddingSource(self.shards + other.shards, self.columns)

    @property
    def has_ids(self) -> bool:
        """Whether the shards carry ids (all of them, or none)."""
        return self._all_or_none([s.has_ids for s in self.shards], "ids")

    @property
    def has_metadata(self) -> bool:
        """Whether the shards carry metadata (all of them, or none)."""
        return self._all_or_none([s.has_metadata for s in self.shards], "metadata")

    def _all_or_none(self, have: list[bool], what: str) -> bool:
        if any(have) and not all(have):
            without = next(s.path for s, h in zip(self.shards, have, strict=True) if not h)
            raise InputError(f"{without}: carries no {what} while other shards do")
        return all(have)

    def ids(self) -> list[str] | None:
        """The shards' ids in row order, unique over all shards; ``None`` if they carry none."""
        if not self.has_ids:
            return None
        return join_ids(self.label, ((s.path, s.ids()) for s in self.shards))

    def metadata(self) -> dict[str, np.ndarray]:
        """The shards' metadata columns over all rows; ``{}`` if they carry none."""
        if not self.has_metadata:
            return {}
        return join_metadata([(s.path, s.metadata()) for s in self.shards])


def as_source(data: np.ndarray | str | Path | EmbeddingSource) -> EmbeddingSource:
    """An :class:`EmbeddingSource` from an in-memory array or a path (:func:`open_embeddings`)."""
    if isinstance(data, EmbeddingSource):
        return data
    if isinstance(data, np.ndarray):
        arr = data if data.ndim == 2 else np.asarray(data)
        check_array(arr, Path("<array>"))
        return EmbeddingSource((NpyShard(arr, Path("<array>")),))
    return open_embeddings(location(data))


def open_embeddings(path: Location, columns: ParquetColumns | None = None) -> EmbeddingSource:
    """Open a ``.npy`` or Parquet file, or a directory of ``.npy`` or of Parquet shards.

    A directory's shards are its ``*.npy`` files or its ``*.parquet`` files, not both (names
    starting with ``_`` or ``.``, such as Spark's ``_SUCCESS``, are not Parquet shards), in
    file-name order; ``.npy`` shards there may have sidecars (:mod:`index_builder.npy_shards`).
    A single file is Parquet if it starts with Parquet's magic bytes. ``columns``: Parquet only.
    """
    columns = columns or ParquetColumns()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not path.is_dir() and not path.is_file():
        raise InputError(f"{path}: not a regular file or directory")
    paths: Sequence[Location]
    if path.is_dir():
        entries: list[Location] = []
        entries += path.files() if isinstance(path, Url) else sorted(p for p in path.iterdir() if p.is_file())
        npys = [p for p in entries if p.suffix == ".npy"]
        parquets = [p for p in entries if p.suffix == PARQUET_SUFFIX and not p.name.startswith(("_", "."))]
        if npys and parquets:
            raise InputError(f"{path}: directory mixes .npy and Parquet shards")
        if not npys and not parquets:
            raise InputError(f"{path}: directory holds no .npy shards or .parquet files")
        paths, parquet = parquets or npys, bool(parquets)
        sidecars = [p.name for p in entries if p.name.endswith((IDS_SIDECAR, METADATA_SIDECAR))]
        if isinstance(path, Url) and sidecars and not parquet:
            raise InputError(
                f"{path}: sidecars ({', '.join(sidecars[:3])}) are not read from a URL; "
                "give --ids / --metadata (local files), or use Parquet shards with id columns"
            )
    else:
        paths, parquet = [path], _is_parquet(path)
    shards: Sequence[Shard]
    if parquet:
        from index_builder.parquet_schema import open_parquet  # pyarrow only for Parquet input

        shards, columns = open_parquet(paths, columns)
    elif columns.chosen:
        raise InputError(
            f"{path}: --embedding-column, --id-column and --metadata-columns apply to Parquet input only"
        )
    elif isinstance(path, Url):
        shards = [open_npy_url(p) for p in paths if isinstance(p, Url)]
    else:
        shards = open_npy([p for p in paths if isinstance(p, Path)], path if path.is_dir() else None)
    _check_compatible(shards)
    source = EmbeddingSource(tuple(shards), columns if parquet else None)
    if source.n == 0:
        raise InputError(f"{path}: input is empty (0 rows)")
    return source


def _is_parquet(path: Location) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc


def _check_compatible(shards: Sequence[Shard]) -> None:
    first = shards[0]
    for s in shards[1:]:
        if s.d != first.d:
            raise InputError(f"{s.path}: dimension {s.d} differs from {first.path}'s {first.d}")
        if s.dtype != first.dtype:
            raise InputError(f"{s.path}: dtype {s.dtype} differs from {first.path}'s {first.dtype}")


def gallery_ids(source: EmbeddingSource, ids_file: Path | None) -> list[str] | None:
    """The gallery's ids: from its shards or from ``ids_file`` (not both); ``None``: row numbers."""
    if source.has_ids:
        if ids_file is not None:
            raise InputError(
                f"{ids_file}: the gallery {source.label} carries its own ids (an id column or "
                ".ids.txt sidecars); give one or the other (--id-column '' reads no Parquet ids)"
            )
        return source.ids()
    return read_ids(ids_file, source.n) if ids_file is not None else None


def gallery_metadata(source: EmbeddingSource, metadata_file: Path | None) -> dict[str, np.ndarray]:
    """The gallery's metadata columns: from its shards or from ``metadata_file`` (not both)."""
    if source.has_metadata:
        if metadata_file is not None:
            raise InputError(
                f"{metadata_file}: the gallery {source.label} carries its own metadata (Parquet "
                "columns or .metadata.csv sidecars); give one or the other (--metadata-columns '' "
                "reads no Parquet columns)"
            )
        return source.metadata()
    return read_metadata(metadata_file, source.n) if metadata_file is not None else {}


def bad_rows(block: np.ndarray, start: int) -> tuple[list[int], list[int]]:
    """Rows of ``block`` (b, d) float32 that are non-finite, and rows that are all zero."""
    nonfinite = np.flatnonzero(~np.isfinite(block).all(axis=1))
    zero = np.flatnonzero(~block.any(axis=1))
    return [start + int(i) for i in nonfinite], [start + int(i) for i in zero]


def raise_for_bad_rows(label: str, nonfinite: list[int], zero: list[int]) -> None:
    """Raise :class:`InputError` naming the first offending rows, if there are any."""
    problems = []
    if nonfinite:
        problems.append(f"NaN or Inf in rows {name_rows(nonfinite)}")
    if zero:
        problems.append(f"all-zero rows {name_rows(zero)}")
    if problems:
        raise InputError(f"{label}: " + "; ".join(problems))


def fingerprint(paths: Sequence[Location]) -> str:
    """A BLAKE2b hash identifying the given files, in order: the build's or a change's input.

    A local file is hashed by its bytes. A URL is not read: its name, size and the version
    fields its store keeps (:meth:`~index_builder.urls.Url.version`: ETag, generation, mtime,
    ...) are hashed, so the fingerprint changes whenever the store says the object changed,
    and also when the same bytes are written again (a new ETag or mtime). A URL whose
    filesystem gives no version field is read and hashed, as a local file is.
    """
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        if not p.is_file():
            continue
        h.update(p.name.encode())
        version = p.version() if isinstance(p, Url) else None
        if version is not None:
            h.update(b"url-version:" + version.encode())
            continue
        if isinstance(p, Url):
            logger.warning("%s: its filesystem names no version of it; reading it to fingerprint it", p)
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
