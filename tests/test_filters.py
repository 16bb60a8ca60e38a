"""Metadata filters: the grammar against brute force, and exact semantics for any JSON number or
string, of any size, against a pure-Python oracle."""

from __future__ import annotations

import operator
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqe_retrieval.errors import FilterError
from aqe_retrieval.filters import DEFAULT_MAX_VALUES, OPERATORS, filter_mask

N = 30
COLUMNS = {
    "camera": np.arange(N, dtype=np.int64) % 6,
    "ts": np.arange(N, dtype=np.int64) * 10,
    "score": np.linspace(0.0, 1.0, N),
    "label": np.array([f"p{i // 6}" for i in range(N)]),
    "small": (np.arange(N) % 3).astype(np.uint8),
}

ORACLE = {
    "eq": lambda a, v: a == v,
    "in": lambda a, v: a in v,
    "not_in": lambda a, v: a not in v,
    "gt": lambda a, v: a > v,
    "gte": lambda a, v: a >= v,
    "lt": lambda a, v: a < v,
    "lte": lambda a, v: a <= v,
}


def oracle(spec: dict[str, Any]) -> np.ndarray:
    """Row by row, in plain Python: every condition of every column holds."""
    out = []
    for i in range(N):
        ok = True
        for name, cond in spec.items():
            ops = cond if isinstance(cond, dict) else {"eq": cond}
            value = COLUMNS[name][i].item()
            ok &= all(ORACLE[op](value, v) for op, v in ops.items())
        out.append(ok)
    return np.array(out, dtype=bool)


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"camera": 4},
        {"camera": {"eq": 4}},
        {"camera": {"in": [1, 2]}},
        {"camera": {"not_in": [3]}},
        {"camera": {"in": []}},
        {"camera": {"not_in": []}},
        {"ts": {"gte": 50, "lt": 200}},
        {"camera": 4, "ts": {"gte": 100}},
        {"score": {"gt": 0.5}},
        {"score": {"lte": 1}},
        {"label": "p2"},
        {"label": {"in": ["p1", "p4"]}},
        {"label": {"not_in": ["p0"]}},
        {"small": {"in": [1, 300, -1]}},  # values a uint8 column cannot hold match nothing
        {"camera": {"in": [2**63]}},
        {"ts": {"lt": 2**70}},  # out-of-range integers compare as floats
        {"ts": {"gt": -(2**70)}},
    ],
)
def test_filter_mask_equals_the_row_by_row_oracle(spec):
    mask = filter_mask(spec, COLUMNS)
    assert mask.dtype == bool and mask.shape == (N,)
    np.testing.assert_array_equal(mask, oracle(spec))


def test_strings_are_matched_whole_not_truncated():
    assert not filter_mask({"label": {"in": ["p1-and-more"]}}, COLUMNS).any()
    assert not filter_mask({"label": "p1-and-more"}, COLUMNS).any()


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["camera", "ts", "small"]),
        st.integers(-5, 300)
        | st.dictionaries(
            st.sampled_from(sorted(OPERATORS - {"in", "not_in"})), st.integers(-5, 300), min_size=1
        )
        | st.dictionaries(st.sampled_from(["in", "not_in"]), st.lists(st.integers(-5, 300)), min_size=1),
    )
)
def test_integer_filters_equal_the_oracle(spec):
    np.testing.assert_array_equal(filter_mask(spec, COLUMNS), oracle(spec))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"colour": 1}, "unknown filter column 'colour'"),
        ({"camera": {}}, "filter on 'camera' has no condition"),
        ({"camera": {"like": 1}}, "unknown operator 'like' on 'camera'"),
        ({"camera": {"in": 3}}, r"camera\.in takes a list, got 3"),
        ({"camera": "x"}, "'x' is not an integer"),
        ({"camera": True}, "True is not an integer"),
        ({"camera": {"in": [1, "2"]}}, "'2' is not an integer"),
        ({"score": "high"}, "'high' is not a number"),
        ({"score": False}, "False is not a number"),
        ({"label": 3}, "3 is not a string"),
        ({"label": {"gt": "a"}}, r"label\.gt: range operators need a numeric column"),
    ],
)
def test_bad_filters_are_refused_with_the_reason(spec, message):
    with pytest.raises(FilterError, match=message):
        filter_mask(spec, COLUMNS)


def test_a_fractional_number_on_an_integer_column_matches_no_row_exactly():
    assert not filter_mask({"camera": 1.5}, COLUMNS).any()
    np.testing.assert_array_equal(filter_mask({"camera": 2.0}, COLUMNS), COLUMNS["camera"] == 2)
    np.testing.assert_array_equal(filter_mask({"camera": {"lt": 1.5}}, COLUMNS), COLUMNS["camera"] <= 1)


def test_a_version_without_metadata_has_no_filters():
    with pytest.raises(FilterError, match="no metadata"):
        filter_mask({"camera": 1}, {})


def test_a_filter_error_is_a_value_error():
    with pytest.raises(ValueError, match="unknown filter column"):
        filter_mask({"nope": 1}, COLUMNS)


I64 = np.iinfo(np.int64)
F32_MAX = float(np.finfo(np.float32).max)
EDGE_COLUMNS = {
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
    kind = EDGE_COLUMNS[name].dtype.kind
    return strings if kind == "U" else ints | floats


def edge_oracle(name: str, op: str, value: object) -> list[bool]:
    rows = EDGE_COLUMNS[name].tolist()
    if op in ("in", "not_in"):
        assert isinstance(value, list)
        hit = [any(x == v for v in value) for x in rows]
        return hit if op == "in" else [not h for h in hit]
    return [OPS[op](x, value) for x in rows]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_condition_agrees_with_python(data):
    name = data.draw(st.sampled_from(sorted(EDGE_COLUMNS)), "column")
    op = data.draw(st.sampled_from([*OPS, "in", "not_in"]), "op")
    if op in ("in", "not_in"):
        value = data.draw(st.lists(values_for(name), max_size=6), "values")
    else:
        value = data.draw(values_for(name), "value")
    if EDGE_COLUMNS[name].dtype.kind == "U" and op not in ("eq", "in", "not_in"):
        with pytest.raises(FilterError, match="numeric column"):
            filter_mask({name: {op: value}}, {name: EDGE_COLUMNS[name]})
        return
    got = filter_mask({name: {op: value}}, {name: EDGE_COLUMNS[name]})
    assert got.dtype == bool and got.tolist() == edge_oracle(name, op, value)


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
    assert filter_mask(spec, {name: EDGE_COLUMNS[name]}).tolist() == expected


def test_the_number_of_values_in_one_condition_is_capped():
    ok = list(range(DEFAULT_MAX_VALUES))
    assert filter_mask({"i64": {"in": ok}}, {"i64": EDGE_COLUMNS["i64"]}).sum() == 4  # 0, 1, 2, 3
    with pytest.raises(FilterError, match=f"{DEFAULT_MAX_VALUES + 1} values, over the limit"):
        filter_mask({"i64": {"not_in": [*ok, 0]}}, {"i64": EDGE_COLUMNS["i64"]})
    with pytest.raises(FilterError, match="3 values, over the limit of 2"):
        filter_mask({"text": {"in": ["a", "b", "c"]}}, {"text": EDGE_COLUMNS["text"]}, max_values=2)


def test_a_huge_value_in_an_error_message_is_shortened():
    with pytest.raises(FilterError) as e:
        filter_mask({"i64": "x" * 200_000}, {"i64": EDGE_COLUMNS["i64"]})
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
