"""Reading and validating the builder's input: embeddings, external ids and metadata.

Embeddings are one ``.npy`` file or a directory of ``.npy`` shards (concatenated in file-name
order), float32 or float16, memory-mapped and read in blocks: never held whole in memory here.
Every problem raises :class:`InputError` naming the file and the offending rows.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqe_retrieval.errors import InputError

logger = logging.getLogger(__name__)

ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MAX_ROWS_NAMED = 10


@dataclass(frozen=True)
class EmbeddingSource:
    """A read-only (n, d) float matrix over one or more memory-mapped ``.npy`` shards."""

    shards: tuple[np.ndarray, ...]
    paths: tuple[Path, ...]

    @property
    def n(self) -> int:
        """Rows over all shards."""
        return sum(s.shape[0] for s in self.shards)

    @property
    def d(self) -> int:
        """Dimension of every row."""
        return int(self.shards[0].shape[1])

    @property
    def dtype(self) -> np.dtype:
        """The rows' stored dtype (float32 or float16)."""
        return self.shards[0].dtype

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)`` with ``block`` (<= block_size, d) float32, in row order."""
        start = 0
        for shard in self.shards:
            for lo in range(0, shard.shape[0], block_size):
                block = np.asarray(shard[lo : lo + block_size], dtype=np.float32)
                yield start + lo, block
            start += shard.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted row numbers) as a (len(rows), d) float32 array."""
        out = np.empty((len(rows), self.d), dtype=np.float32)
        start = 0
        for shard in self.shards:
            mine = (rows >= start) & (rows < start + shard.shape[0])
            out[mine] = shard[rows[mine] - start]
            start += shard.shape[0]
        return out

    def concat(self, other: EmbeddingSource) -> EmbeddingSource:
        """This source's rows followed by ``other``'s (same d; dtypes may differ)."""
        if other.d != self.d:
            raise InputError(f"{other.paths[0]}: dimension {other.d} differs from {self.paths[0]}'s {self.d}")
        return EmbeddingSource(self.shards + other.shards, self.paths + other.paths)


def as_source(data: np.ndarray | str | Path | EmbeddingSource) -> EmbeddingSource:
    """An :class:`EmbeddingSource` from an in-memory array, a ``.npy`` path, or a shard directory."""
    if isinstance(data, EmbeddingSource):
        return data
    if isinstance(data, np.ndarray):
        arr = data if data.ndim == 2 else np.asarray(data)
        _check_array(arr, Path("<array>"))
        return EmbeddingSource((arr,), (Path("<array>"),))
    return open_embeddings(Path(data))


def open_embeddings(path: Path) -> EmbeddingSource:
    """Memory-map a ``.npy`` file or a directory of ``.npy`` shards."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not path.is_dir() and not path.is_file():
        raise InputError(f"{path}: not a regular file or directory")
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
        if not paths:
            raise InputError(f"{path}: directory holds no .npy shards")
    else:
        paths = [path]
    shards = []
    for p in paths:
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{p}: not a readable .npy array ({exc})") from exc
        _check_array(arr, p)
        shards.append(arr)
    _check_compatible(tuple(shards), tuple(paths))
    source = EmbeddingSource(tuple(shards), tuple(paths))
    if source.n == 0:
        raise InputError(f"{path}: input is empty (0 rows)")
    return source


def _check_array(arr: np.ndarray, path: Path) -> None:
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (rows, dim) array, got shape {arr.shape}")
    if arr.dtype not in ACCEPTED_DTYPES:
        raise InputError(f"{path}: dtype {arr.dtype} is not accepted (float32 or float16)")
    if arr.shape[1] == 0:
        raise InputError(f"{path}: dimension is 0")


def _check_compatible(shards: Sequence[np.ndarray], paths: Sequence[Path]) -> None:
    first = shards[0]
    for arr, p in zip(shards[1:], paths[1:], strict=True):
        if arr.shape[1] != first.shape[1]:
            raise InputError(f"{p}: dimension {arr.shape[1]} differs from {paths[0]}'s {first.shape[1]}")
        if arr.dtype != first.dtype:
            raise InputError(f"{p}: dtype {arr.dtype} differs from {paths[0]}'s {first.dtype}")


def bad_rows(block: np.ndarray, start: int) -> tuple[list[int], list[int]]:
    """Rows of ``block`` (b, d) float32 that are non-finite, and rows that are all zero."""
    nonfinite = np.flatnonzero(~np.isfinite(block).all(axis=1))
    zero = np.flatnonzero(~block.any(axis=1))
    return [start + int(i) for i in nonfinite], [start + int(i) for i in zero]


def raise_for_bad_rows(label: str, nonfinite: list[int], zero: list[int]) -> None:
    """Raise :class:`InputError` naming the first offending rows, if there are any."""
    problems = []
    if nonfinite:
        problems.append(f"NaN or Inf in rows {_name_rows(nonfinite)}")
    if zero:
        problems.append(f"all-zero rows {_name_rows(zero)}")
    if problems:
        raise InputError(f"{label}: " + "; ".join(problems))


def _name_rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_NAMED])
    return shown + (" ..." if len(rows) > MAX_ROWS_NAMED else "")


def read_ids(path: Path, n: int) -> list[str]:
    """External ids, one per line (UTF-8); exactly ``n`` of them, unique and non-empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ids ({exc})") from exc
    ids = text.split("\n")
    if ids and ids[-1] == "":
        ids.pop()
    ids = [i.rstrip("\r") for i in ids]
    if len(ids) != n:
        raise InputError(f"{path}: {len(ids)} ids for {n} embeddings")
    empty = [r for r, i in enumerate(ids) if not i]
    if empty:
        raise InputError(f"{path}: empty id on rows {_name_rows(empty)}")
    seen: dict[str, int] = {}
    dups = []
    for row, i in enumerate(ids):
        if i in seen:
            dups.append(f"{i!r} (rows {seen[i]} and {row})")
        else:
            seen[i] = row
    if dups:
        raise InputError(f"{path}: duplicate ids: {', '.join(dups[:MAX_ROWS_NAMED])}")
    return ids


def read_metadata(path: Path, n: int) -> dict[str, np.ndarray]:
    """Metadata columns from a CSV with a header: ``n`` rows; int, float or str columns."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read metadata CSV ({exc})") from exc
    if not header or not all(h.strip() for h in header):
        raise InputError(f"{path}: the first line must be a header naming every column")
    if len(set(header)) != len(header):
        raise InputError(f"{path}: duplicate column names in header {header}")
    if len(rows) != n:
        raise InputError(f"{path}: {len(rows)} metadata rows for {n} embeddings")
    ragged = [r for r, row in enumerate(rows) if len(row) != len(header)]
    if ragged:
        raise InputError(
            f"{path}: rows {_name_rows(ragged)} do not have {len(header)} fields (data row numbers)"
        )
    columns = {}
    for c, name in enumerate(header):
        columns[name.strip()] = _typed_column([row[c] for row in rows])
    return columns


def _typed_column(values: list[str]) -> np.ndarray:
    for dtype in (np.int64, np.float64):
        try:
            return np.array(values, dtype=dtype)
        except (ValueError, OverflowError):
            continue
    return np.array(values, dtype=np.str_)


def fingerprint(paths: Sequence[Path]) -> str:
    """A content hash (BLAKE2b) of the given files, in order: identifies the build's input."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        if not p.is_file():
            continue
        h.update(p.name.encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
