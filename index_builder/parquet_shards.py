"""Parquet gallery shards: embeddings, ids and metadata read one row group at a time.

A shard is one Parquet file: an embedding column (a fixed-size list of float32 or float16, or a
variable-length list whose rows all have the same length, checked as they are read), an
optional id column (string or integer) and metadata columns (int, float or string). Every file
of a gallery has the same columns and types. Reading in blocks holds one row group of the
embedding column (Arrow memory) and the block being filled (``block_size x d x 4`` bytes),
never a whole file. Per-row problems (nulls, ragged lists) are found while reading, like NaN
rows, and raise :class:`InputError` with the file and its row numbers (counted from 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aqe_retrieval.errors import InputError
from index_builder.id_metadata import check_ids, name_rows
from index_builder.inputs import ParquetColumns

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_COLUMN = "embedding"
DEFAULT_ID_COLUMN = "id"
VALUE_DTYPES: dict[Any, np.dtype] = {pa.float32(): np.dtype(np.float32), pa.float16(): np.dtype(np.float16)}


@dataclass(frozen=True)
class ParquetShard:
    """One Parquet file of the gallery; ``row_groups`` holds each row group's row count."""

    path: Path
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
    def files(self) -> tuple[Path, ...]:
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
        with _open(self.path) as pf:
            for g in np.unique(np.searchsorted(bounds, rows, side="right") - 1):
                lo, hi = bounds[g], bounds[g + 1]
                mine = (rows >= lo) & (rows < hi)
                x = self._embeddings(_read_group(pf, self.path, int(g), [self.column]), int(lo))
                out[mine] = x[rows[mine] - lo]
        return out

    def _row_groups(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, (r, d) rows in the stored dtype)`` for each non-empty row group."""
        with _open(self.path) as pf:
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
        with _open(self.path) as pf:
            column = _read_all(pf, self.path, [self.id_column]).column(0)
        if column.null_count:
            rows = _rows(column.is_null(), 0)
            raise InputError(f"{self.path}: null ids in column {self.id_column!r}, rows {rows}")
        ids = column.cast(pa.string()).to_pylist()
        check_ids(self.path, ids)
        return ids

    def metadata(self) -> dict[str, np.ndarray]:
        """The metadata columns: int64, float64 or str arrays, like a metadata CSV gives."""
        with _open(self.path) as pf:
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
            kind = _metadata_kind(column.type)
            try:
                if kind == "i":
                    out[name] = column.cast(pa.int64()).to_numpy()
                elif kind == "f":
                    out[name] = column.cast(pa.float64()).to_numpy()
                else:
                    out[name] = np.array(column.cast(pa.string()).to_pylist(), dtype=np.str_)
            except pa.ArrowInvalid as exc:
                raise InputError(f"{self.path}: metadata column {name!r}: {exc}") from exc
        return out


def _rows(mask: Any, start: int) -> str:
    return name_rows(np.flatnonzero(mask.to_numpy(zero_copy_only=False)) + start)


def _open(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer would cache coalesced column chunks beyond the row group being read
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_group(pf: pq.ParquetFile, path: Path, group: int, columns: list[str]) -> pa.Table:
    try:
        return pf.read_row_group(group, columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read row group {group} ({exc})") from exc


def _read_all(pf: pq.ParquetFile, path: Path, columns: list[str]) -> pa.Table:
    try:
        return pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read columns {columns} ({exc})") from exc


def open_parquet(paths: Sequence[Path], columns: ParquetColumns) -> tuple[list[ParquetShard], ParquetColumns]:
    """The shards of these files (same schema), and the columns read with defaults resolved."""
    files = []
    for p in paths:
        with _open(p) as pf:
            meta = pf.metadata
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            files.append((p, pf.schema_arrow, groups))
    first, schema, _ = files[0]
    if len(set(schema.names)) != len(schema.names):
        raise InputError(f"{first}: duplicate column names {schema.names}")
    for p, other, _ in files[1:]:
        if _signature(other) != _signature(schema):
            raise InputError(f"{p}: schema differs from {first}'s ({_difference(schema, other)})")
    embedding = _embedding_column(schema, columns.embedding, first)
    dtype = _value_dtype(schema.field(embedding), first)
    id_column = _id_column(schema, columns.id, embedding, first)
    metadata = _metadata_columns(schema, columns.metadata, {embedding, id_column}, first)
    list_type = schema.field(embedding).type
    if pa.types.is_fixed_size_list(list_type):
        d = list_type.list_size
    else:
        d = _first_row_length([(p, sum(g)) for p, _, g in files], embedding)
    if d == 0:
        raise InputError(f"{first}: column {embedding!r}: dimension is 0")
    shards = [ParquetShard(p, embedding, d, dtype, g, id_column, metadata) for p, _, g in files]
    return shards, ParquetColumns(embedding, id_column or "", metadata)


def _signature(schema: pa.Schema) -> list[tuple[str, str]]:
    """Column names and types, with equivalent Arrow encodings (large, dictionary) folded."""
    return [(f.name, _normal_type(f.type)) for f in schema]


def _normal_type(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _normal_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return f"list<{_normal_type(t.value_type)}>"
    if pa.types.is_fixed_size_list(t):
        return f"list<{_normal_type(t.value_type)}>[{t.list_size}]"
    return str(t)


def _difference(a: pa.Schema, b: pa.Schema) -> str:
    if a.names != b.names:
        return f"columns {b.names}, expected {a.names}"
    return "; ".join(
        f"{x}: {_normal_type(tb)}, expected {_normal_type(ta)}"
        for x, ta, tb in zip(a.names, a.types, b.types, strict=True)
        if _normal_type(ta) != _normal_type(tb)
    )


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _embedding_column(schema: pa.Schema, name: str | None, path: Path) -> str:
    lists = [f.name for f in schema if _is_list(f.type)]
    if name is None:
        name = lists[0] if len(lists) == 1 else DEFAULT_EMBEDDING_COLUMN
    if name not in schema.names:
        raise InputError(
            f"{path}: no embedding column {name!r} (list columns: {lists}; choose with --embedding-column)"
        )
    return name


def _value_dtype(field: pa.Field, path: Path) -> np.dtype:
    if not _is_list(field.type):
        raise InputError(f"{path}: column {field.name!r} is {field.type}, not a list of floats")
    value_type = field.type.value_type
    if value_type not in VALUE_DTYPES:
        raise InputError(
            f"{path}: column {field.name!r} holds {value_type} values, not accepted (float32 or float16)"
        )
    return VALUE_DTYPES[value_type]


def _id_column(schema: pa.Schema, name: str | None, embedding: str, path: Path) -> str | None:
    if name == "":
        return None
    if name is None:
        if DEFAULT_ID_COLUMN not in schema.names or embedding == DEFAULT_ID_COLUMN:
            return None
        name = DEFAULT_ID_COLUMN
    if name not in schema.names:
        raise InputError(f"{path}: no id column {name!r} (columns: {schema.names})")
    if name == embedding:
        raise InputError(f"{path}: column {name!r} cannot be both the embedding and the id column")
    t = schema.field(name).type
    if not (pa.types.is_integer(t) or _metadata_kind(t) == "U"):
        raise InputError(f"{path}: id column {name!r} is {t}; ids are strings or integers")
    return name


def _metadata_kind(t: pa.DataType) -> str | None:
    """``i``, ``f`` or ``U`` for the Arrow types metadata supports, else ``None``."""
    if pa.types.is_dictionary(t):
        return "U" if _metadata_kind(t.value_type) == "U" else None
    if pa.types.is_integer(t):
        return "i"
    if pa.types.is_floating(t):
        return "f"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "U"
    return None


def _metadata_columns(
    schema: pa.Schema, names: tuple[str, ...] | None, taken: set[str | None], path: Path
) -> tuple[str, ...]:
    if names is not None:
        for name in names:
            if name not in schema.names:
                raise InputError(f"{path}: no metadata column {name!r} (columns: {schema.names})")
            if name in taken:
                raise InputError(f"{path}: column {name!r} is the embedding or id column, not metadata")
            t = schema.field(name).type
            if _metadata_kind(t) is None:
                raise InputError(f"{path}: metadata column {name!r} is {t}; int, float or string expected")
        if len(set(names)) != len(names):
            raise InputError(f"{path}: --metadata-columns names a column twice: {list(names)}")
        return names
    chosen = [f.name for f in schema if f.name not in taken and _metadata_kind(f.type) is not None]
    skipped = [f"{f.name} ({f.type})" for f in schema if f.name not in taken and f.name not in chosen]
    if skipped:
        logger.info("%s: not read as metadata (not int, float or string): %s", path, ", ".join(skipped))
    return tuple(chosen)


def _first_row_length(files: list[tuple[Path, int]], column: str) -> int:
    """The length of the first row's list: the dimension every other row must have."""
    for path, rows in files:
        if not rows:
            continue
        with _open(path) as pf:
            for batch in pf.iter_batches(batch_size=1, columns=[column], use_threads=False):
                if batch.num_rows:
                    first = batch.column(0)
                    if first.null_count:
                        raise InputError(f"{path}: column {column!r}: null embedding in rows 0")
                    return int(pc.list_value_length(first)[0].as_py())
    raise InputError(f"{files[0][0]}: input is empty (0 rows)")
