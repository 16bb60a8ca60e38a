"""Metadata filters against a row-by-row Python oracle, and every refusal with its reason."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aqe_retrieval.errors import FilterError
from aqe_retrieval.filters import OPERATORS, filter_mask

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
        ({"camera": 1.5}, "1.5 is not an integer"),
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


def test_a_version_without_metadata_has_no_filters():
    with pytest.raises(FilterError, match="no metadata"):
        filter_mask({"camera": 1}, {})


def test_a_filter_error_is_a_value_error():
    with pytest.raises(ValueError, match="unknown filter column"):
        filter_mask({"nope": 1}, COLUMNS)
