"""``.npy`` gallery shards: memory-mapped float arrays, with optional per-shard sidecar files.

In a directory of shards, ``part-0001.npy`` may come with ``part-0001.ids.txt`` (one external
id per line, :func:`~index_builder.id_metadata.read_ids`) and ``part-0001.metadata.csv`` (a
header, then one row per embedding, :func:`~index_builder.id_metadata.read_metadata`). Each
kind of sidecar goes with every shard or with none, metadata sidecars share one header, and a
sidecar without its shard is refused: a gallery that grows by a shard a day needs no
whole-gallery id file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqe_retrieval.errors import InputError
from index_builder.id_metadata import MAX_ROWS_NAMED, csv_header, read_ids, read_metadata

ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
IDS_SIDECAR = ".ids.txt"
"""Suffix of a shard's ids sidecar: ``part-0001.npy`` -> ``part-0001.ids.txt``."""
METADATA_SIDECAR = ".metadata.csv"
"""Suffix of a shard's metadata sidecar: ``part-0001.npy`` -> ``part-0001.metadata.csv``."""


@dataclass(frozen=True)
class NpyShard:
    """One memory-mapped ``.npy`` array (or an in-memory one), with optional sidecar files."""

    array: np.ndarray
    path: Path
    ids_file: Path | None = None
    metadata_file: Path | None = None

    @property
    def rows(self) -> int:
        """Rows of this shard."""
        return int(self.array.shape[0])

    @property
    def d(self) -> int:
        """Dimension of every row."""
        return int(self.array.shape[1])

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype (float32 or float16)."""
        return self.array.dtype

    @property
    def files(self) -> tuple[Path, ...]:
        """The array and its sidecars."""
        return (self.path, *(f for f in (self.ids_file, self.metadata_file) if f is not None))

    @property
    def has_ids(self) -> bool:
        """Whether an ids sidecar goes with this shard."""
        return self.ids_file is not None

    @property
    def has_metadata(self) -> bool:
        """Whether a metadata sidecar goes with this shard."""
        return self.metadata_file is not None

    def blocks(self, block_size: int) -> Iterator[np.ndarray]:
        """Consecutive (<= block_size, d) float32 blocks of the rows."""
        for lo in range(0, self.rows, block_size):
            yield np.asarray(self.array[lo : lo + block_size], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted, numbered within this shard) as float32."""
        return np.asarray(self.array[rows], dtype=np.float32)

    def ids(self) -> list[str]:
        """The sidecar's ids."""
        if self.ids_file is None:
            raise InputError(f"{self.path}: no {IDS_SIDECAR} sidecar")
        return read_ids(self.ids_file, self.rows)

    def metadata(self) -> dict[str, np.ndarray]:
        """The sidecar's columns."""
        if self.metadata_file is None:
            raise InputError(f"{self.path}: no {METADATA_SIDECAR} sidecar")
        return read_metadata(self.metadata_file, self.rows)


def open_npy(paths: list[Path], directory: Path | None) -> list[NpyShard]:
    """Memory-map each ``.npy``; with the shards' ``directory``, find their sidecars too."""
    arrays = []
    for p in paths:
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{p}: not a readable .npy array ({exc})") from exc
        check_array(arr, p)
        arrays.append(arr)
    if directory is None:
        return [NpyShard(a, p) for a, p in zip(arrays, paths, strict=True)]
    ids = _sidecars(directory, paths, IDS_SIDECAR)
    meta = _sidecars(directory, paths, METADATA_SIDECAR)
    headers = [(m, csv_header(m)) for m in meta if m is not None]
    for m, header in headers[1:]:
        if header != headers[0][1]:
            raise InputError(f"{m}: header {header} differs from {headers[0][0]}'s {headers[0][1]}")
    return [NpyShard(*shard) for shard in zip(arrays, paths, ids, meta, strict=True)]


def _sidecars(directory: Path, shards: list[Path], suffix: str) -> list[Path | None]:
    """Each shard's sidecar ``<stem><suffix>``: every shard has one, or none does."""
    found = [p.with_name(p.stem + suffix) for p in shards]
    have = [f.is_file() for f in found]
    if any(have) and not all(have):
        without = [p.name for p, h in zip(shards, have, strict=True) if not h]
        raise InputError(
            f"{directory}: shards {_name_list(without)} have no {suffix} sidecar while others do "
            "(give every shard one, or none)"
        )
    stems = {p.stem for p in shards}
    stray = sorted(
        f.name for f in directory.iterdir() if f.name.endswith(suffix) and f.name[: -len(suffix)] not in stems
    )
    if stray:
        raise InputError(f"{directory}: sidecars {_name_list(stray)} belong to no .npy shard")
    return list(found) if all(have) else [None] * len(shards)


def _name_list(names: list[str]) -> str:
    return ", ".join(names[:MAX_ROWS_NAMED]) + (" ..." if len(names) > MAX_ROWS_NAMED else "")


def check_array(arr: np.ndarray, path: Path) -> None:
    """Raise :class:`InputError` unless ``arr`` is a 2-D float32/float16 array with d >= 1."""
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (rows, dim) array, got shape {arr.shape}")
    if arr.dtype not in ACCEPTED_DTYPES:
        raise InputError(f"{path}: dtype {arr.dtype} is not accepted (float32 or float16)")
    if arr.shape[1] == 0:
        raise InputError(f"{path}: dimension is 0")
