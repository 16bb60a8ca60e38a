"""Parquet gallery files opened: one schema across the files, and the columns that hold what.

Every file of a gallery has the same column names and types (Arrow's large and dictionary
encodings of the same type count as equal). The embedding column is a list of float32 or
float16; the id column strings or integers; metadata columns int, float or string (by default
every other column of those types, the rest skipped with a log line). Only footers are read
here, plus the first row of a variable-length list column for the dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aqe_retrieval.errors import InputError
from index_builder.inputs import ParquetColumns
from index_builder.parquet_shards import ParquetShard, open_file
from index_builder.urls import Location

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_COLUMN = "embedding"
DEFAULT_ID_COLUMN = "id"
VALUE_DTYPES: dict[Any, np.dtype] = {pa.float32(): np.dtype(np.float32), pa.float16(): np.dtype(np.float16)}


def open_parquet(
    paths: Sequence[Location], columns: ParquetColumns
) -> tuple[list[ParquetShard], ParquetColumns]:
    """The shards of these files (same schema), and the columns read with defaults resolved."""
    files = []
    for p in paths:
        with open_file(p) as pf:
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


def _embedding_column(schema: pa.Schema, name: str | None, path: Location) -> str:
    lists = [f.name for f in schema if _is_list(f.type)]
    if name is None:
        name = lists[0] if len(lists) == 1 else DEFAULT_EMBEDDING_COLUMN
    if name not in schema.names:
        raise InputError(
            f"{path}: no embedding column {name!r} (list columns: {lists}; choose with --embedding-column)"
        )
    return name


def _value_dtype(field: pa.Field, path: Location) -> np.dtype:
    if not _is_list(field.type):
        raise InputError(f"{path}: column {field.name!r} is {field.type}, not a list of floats")
    value_type = field.type.value_type
    if value_type not in VALUE_DTYPES:
        raise InputError(
            f"{path}: column {field.name!r} holds {value_type} values, not accepted (float32 or float16)"
        )
    return VALUE_DTYPES[value_type]


def _id_column(schema: pa.Schema, name: str | None, embedding: str, path: Location) -> str | None:
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
    schema: pa.Schema, names: tuple[str, ...] | None, taken: set[str | None], path: Location
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


def _first_row_length(files: list[tuple[Location, int]], column: str) -> int:
    """The length of the first row's list: the dimension every other row must have."""
    for path, rows in files:
        if not rows:
            continue
        with open_file(path) as pf:
            for batch in pf.iter_batches(batch_size=1, columns=[column], use_threads=False):
                if batch.num_rows:
                    first = batch.column(0)
                    if first.null_count:
                        raise InputError(f"{path}: column {column!r}: null embedding in rows 0")
                    return int(pc.list_value_length(first)[0].as_py())
    raise InputError(f"{files[0][0]}: input is empty (0 rows)")
