"""Metadata filters: a request's ``filter`` object turned into a boolean mask over gallery rows.

Grammar, per column (all conditions are ANDed)::

    {"camera": 4}                    equal
    {"camera": {"in": [1, 2]}}       one of
    {"camera": {"not_in": [3]}}      none of
    {"timestamp": {"gte": 10, "lt": 20}}   range (gt, gte, lt, lte), numeric columns only
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aqe_retrieval.errors import FilterError

OPERATORS = {"in", "not_in", "gt", "gte", "lt", "lte", "eq"}


def filter_mask(spec: dict[str, Any], columns: dict[str, np.ndarray]) -> np.ndarray:
    """Rows (n,) bool of the gallery that satisfy every condition of ``spec``."""
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
            mask &= _condition(name, col, op, value)
    return mask


def _condition(name: str, col: np.ndarray, op: str, value: Any) -> np.ndarray:
    if op not in OPERATORS:
        raise FilterError(f"unknown operator {op!r} on {name!r}; use one of {sorted(OPERATORS)}")
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            raise FilterError(f"{name}.{op} takes a list, got {value!r}")
        values = [_typed(name, col, v) for v in value]
        if col.dtype.kind in "iu":  # a value the column cannot hold matches no row
            info = np.iinfo(col.dtype)
            values = [v for v in values if info.min <= v <= info.max]
        # no dtype= here: casting to the column's dtype would truncate longer strings
        hit = np.isin(col, np.array(values)) if values else np.zeros(len(col), bool)
        return hit if op == "in" else ~hit
    v = _typed(name, col, value)
    if col.dtype.kind in "iu" and not np.iinfo(col.dtype).min <= v <= np.iinfo(col.dtype).max:
        v = float(v)  # compare out-of-range integers as floats instead of overflowing
    if op == "eq":
        return np.asarray(col == v)
    if col.dtype.kind not in "iuf":
        raise FilterError(f"{name}.{op}: range operators need a numeric column")
    return {"gt": col > v, "gte": col >= v, "lt": col < v, "lte": col <= v}[op]


def _typed(name: str, col: np.ndarray, value: Any) -> Any:
    kind = col.dtype.kind
    ok = (
        (kind in "iu" and isinstance(value, int) and not isinstance(value, bool))
        or (kind == "f" and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind == "U" and isinstance(value, str))
    )
    if not ok:
        expected = {"i": "an integer", "u": "an integer", "f": "a number", "U": "a string"}[kind]
        raise FilterError(f"filter on {name!r}: {value!r} is not {expected}")
    return value
