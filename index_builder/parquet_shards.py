"""Parquet gallery shards: embeddings, ids and metadata read one row group at a time.

A shard is one Parquet file whose columns :mod:`index_builder.parquet_schema` has checked and
chosen: an embedding column (a fixed-size list of float32 or float16, or a variable-length list
whose rows all have the same length, checked as they are read), an optional id column (string
or integer) and metadata columns (int, float or string). Reading in blocks holds one row group
of the embedding column (Arrow memory) and the block being filled (``block_size x d x 4``
bytes), never a whole file. Per-row problems (nulls, ragged lists) are found while reading,
like NaN rows, and raise :class:`InputError` with the file and its row numbers (from 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aqe_retrieval.errors import InputError
from index_builder.id_metadata import check_ids, name_rows
from index_builder.urls import Location, Url


@dataclass(frozen=True)
class ParquetShard:
    """One Parquet file of the gallery; ``row_groups`` holds each row group's row count."""

    path: Location
    column: str
    d: int
    dtype: np.dtype
    row_groups: tuple[int, ...]
    id_column: str | None
    metadata_names: tuple[str, ...]

    @property
    def rows(self) -> int:
        """Rows of this file."""
        return sum(self.row_groups)

    @property
    def files(self) -> tuple[Location, ...]:
        """The one file read."""
        return (self.path,)

    @property
    def has_ids(self) -> bool:
        """Whether an id column is read."""
        return self.id_column is not None

    @property
    def has_metadata(self) -> bool:
        """Whether metadata columns are read."""
        return bool(self.metadata_names)

    def blocks(self, block_size: int) -> Iterator[np.ndarray]:
        """Consecutive (block_size, d) float32 blocks (the last may be shorter), across row groups."""
        left, block, fill = self.rows, None, 0
        for _, x in self._row_groups():
            pos = 0
            while pos < len(x):
                if block is None:
                    block, fill = np.empty((min(block_size, left), self.d), dtype=np.float32), 0
                m = min(len(block) - fill, len(x) - pos)
                block[fill : fill + m] = x[pos : pos + m]
                fill, pos = fill + m, pos + m
                if fill == len(block):
                    left -= fill
                    yield block
                    block = None
            del x  # the row group's Arrow buffers go before the next one is read

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted, numbered within this file) as float32, reading only their groups."""
        out = np.empty((len(rows), self.d), dtype=np.float32)
        bounds = np.cumsum((0, *self.row_groups))
        with open_file(self.path) as pf:
            for g in np.unique(np.searchsorted(bounds, rows, side="right") - 1):
                lo, hi = bounds[g], bounds[g + 1]
                mine = (rows >= lo) & (rows < hi)
                x = self._embeddings(_read_group(pf, self.path, int(g), [self.column]), int(lo))
                out[mine] = x[rows[mine] - lo]
        return out

    def _row_groups(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, (r, d) rows in the stored dtype)`` for each non-empty row group."""
        with open_file(self.path) as pf:
            start = 0
            for g, r in enumerate(self.row_groups):
                if r:
                    yield start, self._embeddings(_read_group(pf, self.path, g, [self.column]), start)
                start += r

    def _embeddings(self, table: pa.Table, start: int) -> np.ndarray:
        """The embedding column of one row group as (r, d), checked for nulls and ragged rows."""
        column = table.column(0)
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        where = f"{self.path}: column {self.column!r}"
        if arr.null_count:
            raise InputError(f"{where}: null embedding in rows {_rows(arr.is_null(), start)}")
        if not pa.types.is_fixed_size_list(arr.type):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            ragged = np.flatnonzero(lengths != self.d)
            if ragged.size:
                raise InputError(
                    f"{where}: ragged lists: row {start + ragged[0]} has {lengths[ragged[0]]} values, "
                    f"expected {self.d} (rows {name_rows(ragged + start)})"
                )
        values = arr.flatten()
        if values.null_count:
            nulls = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
            rows = name_rows(np.unique(nulls // self.d) + start)
            raise InputError(f"{where}: null values inside the embeddings of rows {rows}")
        return values.to_numpy(zero_copy_only=False).reshape(-1, self.d)

    def ids(self) -> list[str]:
        """The id column as strings: no nulls, none empty, unique within the file."""
        assert self.id_column is not None
        with open_file(self.path) as pf:
            column = _read_all(pf, self.path, [self.id_column]).column(0)
        if column.null_count:
            rows = _rows(column.is_null(), 0)
            raise InputError(f"{self.path}: null ids in column {self.id_column!r}, rows {rows}")
        ids = column.cast(pa.string()).to_pylist()
        check_ids(self.path, ids)
        return ids

    def metadata(self) -> dict[str, np.ndarray]:
        """The metadata columns: int64, float64 or str arrays, like a metadata CSV gives."""
        with open_file(self.path) as pf:
            table = _read_all(pf, self.path, list(self.metadata_names))
        out = {}
        for name in self.metadata_names:
            column = table.column(name)
            if column.null_count:
                rows = _rows(column.is_null(), 0)
                raise InputError(
                    f"{self.path}: null values in metadata column {name!r}, rows {rows} "
                    "(fill them, or leave the column out with --metadata-columns)"
                )
            try:
                if pa.types.is_integer(column.type):
                    out[name] = column.cast(pa.int64()).to_numpy()
                elif pa.types.is_floating(column.type):
                    out[name] = column.cast(pa.float64()).to_numpy()
                else:
                    out[name] = np.array(column.cast(pa.string()).to_pylist(), dtype=np.str_)
            except pa.ArrowInvalid as exc:
                raise InputError(f"{self.path}: metadata column {name!r}: {exc}") from exc
        return out


def _rows(mask: Any, start: int) -> str:
    return name_rows(np.flatnonzero(mask.to_numpy(zero_copy_only=False)) + start)


def open_file(path: Location) -> pq.ParquetFile:
    """The Parquet file at ``path`` (local or a URL), opened for reading one row group at a time."""
    try:
        # pre_buffer would cache coalesced column chunks beyond the row group being read
        # a URL: pyarrow reads ranges of the fsspec file (footer, then one row group at a time)
        return pq.ParquetFile(path.open() if isinstance(path, Url) else path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_group(pf: pq.ParquetFile, path: Location, group: int, columns: list[str]) -> pa.Table:
    try:
        return pf.read_row_group(group, columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read row group {group} ({exc})") from exc


def _read_all(pf: pq.ParquetFile, path: Location, columns: list[str]) -> pa.Table:
    try:
        return pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read columns {columns} ({exc})") from exc
