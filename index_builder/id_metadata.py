"""External ids and metadata columns: read from text files, checked, joined over shards.

Ids are strings, unique over the whole gallery and non-empty. Metadata columns are int64,
float64 or str arrays, one value per row; CSV values are typed per column (int if every value
parses as one, else float, else string). Every problem raises :class:`InputError` naming the
file and the offending rows.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from aqe_retrieval.errors import InputError
from index_builder.urls import Location

MAX_ROWS_NAMED = 10


def name_rows(rows: Sequence[int] | np.ndarray) -> str:
    """The first :data:`MAX_ROWS_NAMED` row numbers, for a message."""
    shown = ", ".join(str(int(r)) for r in rows[:MAX_ROWS_NAMED])
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
    check_ids(path, ids)
    return ids


def check_ids(path: Location, ids: list[str]) -> None:
    """Raise :class:`InputError` naming ``path`` if an id is empty or repeated."""
    empty = [r for r, i in enumerate(ids) if not i]
    if empty:
        raise InputError(f"{path}: empty id on rows {name_rows(empty)}")
    seen: dict[str, int] = {}
    dups = []
    for row, i in enumerate(ids):
        if i in seen:
            dups.append(f"{i!r} (rows {seen[i]} and {row})")
        else:
            seen[i] = row
    if dups:
        raise InputError(f"{path}: duplicate ids: {', '.join(dups[:MAX_ROWS_NAMED])}")


def join_ids(label: str, parts: Iterable[tuple[Location, list[str]]]) -> list[str]:
    """Shards' ids in order, checked unique across shards (each shard's ids checked already)."""
    ids: list[str] = []
    seen: dict[str, tuple[Location, int]] = {}
    dups: list[str] = []
    for path, part in parts:
        for row, i in enumerate(part):
            first = seen.setdefault(i, (path, row))
            if first != (path, row):
                dups.append(f"{i!r} ({first[0]} row {first[1]} and {path} row {row})")
        ids.extend(part)
    if dups:
        raise InputError(f"{label}: duplicate ids: {', '.join(dups[:MAX_ROWS_NAMED])}")
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
            f"{path}: rows {name_rows(ragged)} do not have {len(header)} fields (data row numbers)"
        )
    columns = {}
    for c, name in enumerate(header):
        columns[name.strip()] = _typed_column([row[c] for row in rows])
    return columns


def csv_header(path: Path) -> list[str]:
    """The column names of a metadata CSV (its first line)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read metadata CSV ({exc})") from exc


def _typed_column(values: list[str]) -> np.ndarray:
    for dtype in (np.int64, np.float64):
        try:
            return np.array(values, dtype=dtype)
        except (ValueError, OverflowError):
            continue
    return np.array(values, dtype=np.str_)


def join_metadata(parts: Sequence[tuple[Location, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Shards' metadata columns, concatenated: the same names in every shard, and a column is
    string in every shard or in none (int in some shards and float in others gives float)."""
    first_path, first = parts[0]
    for path, part in parts[1:]:
        if list(part) != list(first):
            raise InputError(
                f"{path}: metadata columns {list(part)} differ from {first_path}'s {list(first)}"
            )
    columns = {}
    for name, values in first.items():
        for path, part in parts[1:]:
            if (part[name].dtype.kind == "U") != (values.dtype.kind == "U"):
                raise InputError(
                    f"{path}: metadata column {name!r} is {_kind(part[name])} here "
                    f"but {_kind(values)} in {first_path}"
                )
        columns[name] = np.concatenate([part[name] for _, part in parts])
    return columns


def _kind(values: np.ndarray) -> str:
    return {"i": "int", "f": "float", "U": "string"}.get(values.dtype.kind, str(values.dtype))
