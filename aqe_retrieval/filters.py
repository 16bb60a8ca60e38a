"""Metadata filters: a request's ``filter`` object turned into a boolean mask over gallery rows.

Grammar, per column (all conditions are ANDed)::

    {"camera": 4}                    equal
    {"camera": {"in": [1, 2]}}       one of (at most ``max_values`` values)
    {"camera": {"not_in": [3]}}      none of
    {"timestamp": {"gte": 10, "lt": 20}}   range (gt, gte, lt, lte), numeric columns only

Semantics are exactly Python's: a row ``x`` matches ``{"gt": v}`` when ``x > v`` for the Python
value ``x`` (``column.tolist()``) and the JSON value ``v``, ints and floats compared exactly as
Python compares them. Nothing is converted where precision would be lost: ``v`` is replaced by
the column value(s) it falls between, so ``10**400`` on an int64 column matches no ``eq`` and
every ``lt``, and ``2**53 + 1`` on a float64 column lies strictly between two floats. A string
longer than the column's width (or ending in NUL, which numpy strips) cannot match any row and
is dropped before any array is built; the values of ``in``/``not_in`` are built at the
column's own dtype.

Memory per request: ``O(n_rows)`` for the mask (one byte a row), plus
``O(values * column itemsize)`` for the values of one condition, plus a fixed block of
``BLOCK_ROWS * (itemsize + 8)`` bytes for ``in``/``not_in`` (the column is read in blocks, never
copied whole): independent of how long the request's strings are beyond the column's width.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from aqe_retrieval.errors import FilterError

OPERATORS = {"in", "not_in", "gt", "gte", "lt", "lte", "eq"}
RANGE = {"gt", "gte", "lt", "lte"}
DEFAULT_MAX_VALUES = 1024
BLOCK_ROWS = 65536


def filter_mask(
    spec: dict[str, Any], columns: dict[str, np.ndarray], *, max_values: int = DEFAULT_MAX_VALUES
) -> np.ndarray:
    """Rows (n,) bool of the gallery that satisfy every condition of ``spec``.

    ``max_values`` caps the list of one ``in``/``not_in`` condition (:class:`FilterError` beyond).
    """
    if not columns:
        raise FilterError("this index version has no metadata: filters are unavailable")
    n = len(next(iter(columns.values())))
    mask = np.ones(n, dtype=bool)
    for name, cond in spec.items():
        if name not in columns:
            raise FilterError(f"unknown filter column {name!r}; known: {sorted(columns)}")
        col = columns[name]
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        if not ops:
            raise FilterError(f"filter on {name!r} has no condition")
        for op, value in ops.items():
            mask &= _condition(name, col, op, value, max_values)
    return mask


def _condition(name: str, col: np.ndarray, op: str, value: Any, max_values: int) -> np.ndarray:
    if op not in OPERATORS:
        raise FilterError(f"unknown operator {op!r} on {name!r}; use one of {sorted(OPERATORS)}")
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            raise FilterError(f"{name}.{op} takes a list, got {_short(value)}")
        if len(value) > max_values:
            raise FilterError(f"{name}.{op} has {len(value)} values, over the limit of {max_values}")
        for v in value:
            _check_type(name, col, v)
        hit = _isin(col, [e for e in (_exact(col, v) for v in value) if e is not None])
        return hit if op == "in" else ~hit
    _check_type(name, col, value)
    if op == "eq":
        exact = _exact(col, value)
        return np.zeros(len(col), bool) if exact is None else np.asarray(col == exact)
    if col.dtype.kind not in "iuf":
        raise FilterError(f"{name}.{op}: range operators need a numeric column")
    return _range(col, op, value)


def _check_type(name: str, col: np.ndarray, value: Any) -> None:
    kind = col.dtype.kind
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (kind in "iuf" and number) or (kind == "U" and isinstance(value, str))
    if not ok:
        expected = {"i": "an integer", "u": "an integer", "f": "a number", "U": "a string"}.get(
            kind, f"usable on a {col.dtype} column"
        )
        raise FilterError(f"filter on {name!r}: {_short(value)} is not {expected}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _exact(col: np.ndarray, value: int | float | str) -> Any:
    """``value`` as a scalar of the column's dtype equal to it, or None if no row can equal it."""
    if isinstance(value, str):  # on a str column (types were checked)
        if len(value) > col.dtype.itemsize // 4 or value.endswith("\0"):
            return None
        return col.dtype.type(value)
    if col.dtype.kind in "iu":
        if isinstance(value, float):
            if not value.is_integer():  # NaN and inf are not integers either
                return None
            value = int(value)  # exact
        info = np.iinfo(col.dtype)
        return col.dtype.type(value) if info.min <= value <= info.max else None
    below, above = _neighbours(col.dtype, value)
    return below if below is not None and below == above else None


def _neighbours(dtype: np.dtype, value: int | float) -> tuple[Any, Any]:
    """The largest ``dtype`` float <= ``value`` and the smallest >= it (equal when exact).

    Comparisons run on Python ``float`` and ``int``, which Python compares exactly; ``None``
    stands for minus or plus infinity beyond the dtype's finite range, both None for NaN.
    """
    ftype = dtype.type
    if isinstance(value, float) and math.isnan(value):
        return None, None
    top = float(np.finfo(dtype).max)
    infinite = isinstance(value, float) and math.isinf(value)
    if value > top:
        return ftype(np.inf) if infinite else ftype(top), ftype(np.inf)
    if value < -top:
        return ftype(-np.inf), ftype(-np.inf) if infinite else ftype(-top)
    c = ftype(float(value))  # within range: float() cannot overflow here
    if float(c) > value:
        while float(np.nextafter(c, ftype(-np.inf))) >= value:
            c = np.nextafter(c, ftype(-np.inf))
    else:
        while float(np.nextafter(c, ftype(np.inf))) <= value:
            c = np.nextafter(c, ftype(np.inf))
    if float(c) == value:
        return c, c
    if float(c) > value:
        return np.nextafter(c, ftype(-np.inf)), c
    return c, np.nextafter(c, ftype(np.inf))


def _range(col: np.ndarray, op: str, value: int | float) -> np.ndarray:
    """``col op value`` exactly, comparing with column-dtype scalars only."""
    n = len(col)
    if col.dtype.kind == "f":
        below, above = _neighbours(col.dtype, value)
        if below is None:  # NaN: every comparison is false
            return np.zeros(n, bool)
        if below == above:
            return _compare(col, op, below)
        # strictly between two floats: > and >= both mean >= above, < and <= mean <= below
        return np.asarray(col >= above) if op in ("gt", "gte") else np.asarray(col <= below)
    if isinstance(value, float):
        if math.isnan(value):
            return np.zeros(n, bool)
        if not value.is_integer() and not math.isinf(value):
            # x > 2.5 and x >= 2.5 mean x >= 3 for integers; x < 2.5 and x <= 2.5 mean x <= 2
            value, op = (math.ceil(value), "gte") if op in ("gt", "gte") else (math.floor(value), "lte")
        elif not math.isinf(value):
            value = int(value)
    info = np.iinfo(col.dtype)
    if value > info.max:
        return np.full(n, op in ("lt", "lte"))
    if value < info.min:
        return np.full(n, op in ("gt", "gte"))
    return _compare(col, op, col.dtype.type(value))


def _compare(col: np.ndarray, op: str, v: Any) -> np.ndarray:
    if op == "gt":
        return np.asarray(col > v)
    if op == "gte":
        return np.asarray(col >= v)
    if op == "lt":
        return np.asarray(col < v)
    return np.asarray(col <= v)


def _isin(col: np.ndarray, values: list[Any]) -> np.ndarray:
    """``col`` (n,) in ``values`` (scalars of its dtype), reading the column in blocks."""
    hit = np.zeros(len(col), bool)
    if not values:
        return hit
    table = np.unique(np.array(values, dtype=col.dtype))  # sorted; no NaN (_exact drops it)
    for lo in range(0, len(col), BLOCK_ROWS):
        block = col[lo : lo + BLOCK_ROWS]
        at = np.minimum(np.searchsorted(table, block), len(table) - 1)
        hit[lo : lo + BLOCK_ROWS] = table[at] == block
    return hit
