"""The one TOML writer: what it writes, tomllib reads back unchanged."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlsgd_dsl.tomlio import dumps, hierarchy_dumps, inline

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

keys = st.text(min_size=1, max_size=12)  # any unicode: bare keys must be ASCII, quoted otherwise
scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
           | st.floats(allow_nan=False))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
documents = st.dictionaries(keys, values | st.none(), max_size=6)


def without_none(value):
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_round_trip_through_tomllib(doc) -> None:
    assert tomllib.loads(dumps(doc)) == without_none(doc)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_inline_values_round_trip(value) -> None:
    # one line: what a `--set key=value` override (mlsgd_dsl.bench.as_override) carries
    text = inline(value)
    assert "\n" not in text and tomllib.loads(f"v = {text}")["v"] == value


def test_non_ascii_keys_are_quoted() -> None:
    # run.py's old writer wrote `é = 1` as a bare key, which tomllib refuses
    text = dumps({"levels": {"fein-é": {"h": 1.0}}, "ü": [1, 2]})
    assert tomllib.loads(text) == {"levels": {"fein-é": {"h": 1.0}}, "ü": [1, 2]}


def test_none_in_an_array_is_refused_not_dropped() -> None:
    # the old writer dropped it, shifting the items after it
    with pytest.raises(ValueError, match=r"^a\[0\]\.b: an array with a None item"):
        dumps({"a": [{"b": [1, None, 3]}]})


def test_non_finite_floats() -> None:
    back = tomllib.loads(dumps({"x": math.inf, "y": -math.inf, "z": math.nan}))
    assert back["x"] == math.inf and back["y"] == -math.inf and math.isnan(back["z"])


def test_a_resolved_hierarchy_without_default_rule_keeps_its_meaning() -> None:
    text = hierarchy_dumps({"name": "x", "transfer": {"default": None, "rules": {"*": "a"}}})
    assert tomllib.loads(text)["transfer"] == {"default": False, "rules": {"*": "a"}}
