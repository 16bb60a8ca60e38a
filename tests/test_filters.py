"""Metadata filters against a pure-Python oracle: any JSON number or string, of any size."""

from __future__ import annotations

import operator
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqe_retrieval.errors import FilterError
from aqe_retrieval.filters import DEFAULT_MAX_VALUES, filter_mask

I64 = np.iinfo(np.int64)
F32_MAX = float(np.finfo(np.float32).max)
COLUMNS = {
    "i64": np.array([I64.min, I64.min + 1, -(2**53) - 1, -1, 0, 1, 2, 3, 2**53 + 1, I64.max], np.int64),
    "i32": np.array([-(2**31), -7, 0, 5, 2**31 - 1], np.int32),
    "u64": np.array([0, 1, 2**63, 2**64 - 1], np.uint64),
    "f64": np.array(
        [-np.inf, -1e308, -2.5, -0.0, 0.0, 5e-324, 0.1, 1.0, 2.0**53, 2.0**53 + 2, 1e308, np.inf, np.nan],
        np.float64,
    ),
    "f32": np.array(
        [-np.inf, -F32_MAX, -1.5, 0.0, 1e-45, 0.1, 16777216.0, F32_MAX, np.inf, np.nan], np.float32
    ),
    "text": np.array(["", "a", "a0", "ab", "é", "p10", "xxxxxxxx", "a\0b"], np.str_),
}
OPS = {"eq": operator.eq, "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}

near = st.sampled_from(
    [0, 1, -1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400, -(10**400), 10**5000]
)
ints = st.integers() | st.integers(-(10**500), 10**500) | near | near.map(lambda v: v - 1)
floats = st.floats() | st.sampled_from(
    [1e308, -1e308, 2.0**53 + 1, 2.5, -2.5, 0.1, 1e-45, 3.4028235e38, 3.5e38]
)
strings = (
    st.text(max_size=12)
    | st.sampled_from(["a", "a0", "a\0", "a\0b", "xxxxxxxx", "xxxxxxxxx"])
    | st.builds(operator.mul, st.sampled_from(["x", "a", "é", "\0"]), st.integers(0, 200_000))
)


def values_for(name: str) -> st.SearchStrategy:
    kind = COLUMNS[name].dtype.kind
    return strings if kind == "U" else ints | floats


def oracle(name: str, op: str, value: object) -> list[bool]:
    rows = COLUMNS[name].tolist()
    if op in ("in", "not_in"):
        assert isinstance(value, list)
        hit = [any(x == v for v in value) for x in rows]
        return hit if op == "in" else [not h for h in hit]
    return [OPS[op](x, value) for x in rows]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_condition_agrees_with_python(data):
    name = data.draw(st.sampled_from(sorted(COLUMNS)), "column")
    op = data.draw(st.sampled_from([*OPS, "in", "not_in"]), "op")
    if op in ("in", "not_in"):
        value = data.draw(st.lists(values_for(name), max_size=6), "values")
    else:
        value = data.draw(values_for(name), "value")
    if COLUMNS[name].dtype.kind == "U" and op not in ("eq", "in", "not_in"):
        with pytest.raises(FilterError, match="numeric column"):
            filter_mask({name: {op: value}}, {name: COLUMNS[name]})
        return
    got = filter_mask({name: {op: value}}, {name: COLUMNS[name]})
    assert got.dtype == bool and got.tolist() == oracle(name, op, value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"i64": 10**400}, [False] * 10),
        ({"i64": {"lt": 10**400}}, [True] * 10),
        ({"i64": {"gte": -(10**400)}}, [True] * 10),
        ({"i64": {"gt": 1e308}}, [False] * 10),
        ({"i64": {"lte": 2.5}}, [True] * 7 + [False] * 3),
        ({"f64": {"gt": 10**400}}, [False] * 11 + [True, False]),
        ({"f64": 2**53 + 1}, [False] * 13),
        ({"f64": {"lt": 2**53 + 1}}, [True] * 9 + [False] * 4),
    ],
)
def test_values_beyond_the_column_compare_exactly(spec, expected):
    (name,) = spec
    assert filter_mask(spec, {name: COLUMNS[name]}).tolist() == expected


def test_the_number_of_values_in_one_condition_is_capped():
    ok = list(range(DEFAULT_MAX_VALUES))
    assert filter_mask({"i64": {"in": ok}}, {"i64": COLUMNS["i64"]}).sum() == 4  # 0, 1, 2, 3
    with pytest.raises(FilterError, match=f"{DEFAULT_MAX_VALUES + 1} values, over the limit"):
        filter_mask({"i64": {"not_in": [*ok, 0]}}, {"i64": COLUMNS["i64"]})
    with pytest.raises(FilterError, match="3 values, over the limit of 2"):
        filter_mask({"text": {"in": ["a", "b", "c"]}}, {"text": COLUMNS["text"]}, max_values=2)


def test_a_huge_value_in_an_error_message_is_shortened():
    with pytest.raises(FilterError) as e:
        filter_mask({"i64": "x" * 200_000}, {"i64": COLUMNS["i64"]})
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("op", ["eq", "in", "not_in"])
def test_a_string_far_longer_than_the_column_costs_memory_of_the_request_only(op):
    n = 2000
    column = np.array([f"a{i}" for i in range(n)], np.str_)  # <U5
    value = "x" * 200_000
    spec = {"text": value if op == "eq" else {op: [value, "a0", "a17", value + "y"]}}
    tracemalloc.start()
    try:
        mask = filter_mask(spec, {"text": column})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mask.sum() == {"eq": 0, "in": 2, "not_in": n - 2}[op]
    # n bools + a few values at the column's width + one block: far below n * 200,000 chars
    assert peak < 2 * 1024 * 1024, peak
