"""Config patterns: PEFT's get_pattern_key semantics (re.match(rf"(.*\\.)?({key})$", path)), bounded."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters import patterns
from server.adapters.errors import AdapterFormatError
from server.adapters.patterns import PatternTable, TargetModules

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.11.self_attn.v_proj"]
plain_keys = st.text(alphabet="ab._1q", min_size=1, max_size=6)
regex_keys = st.sampled_from([r"q_proj", r"layers\.1\..*", r".*down_proj", r"(q|v)_proj", r"layers\.[0-9]+\.mlp\..*",
                              r"mlp\.(up|down)_proj", r"self_attn\.\w+", r"\d\.self_attn\.q_proj"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(keys=st.lists(st.one_of(plain_keys, regex_keys), min_size=1, max_size=4),
       path=st.one_of(st.sampled_from(PATHS), st.text(alphabet="ab._1q", max_size=9)))
def test_first_key_equals_peft_re_match(keys, path):
    """Plain keys take a string fast path, others the regex module: both agree with PEFT's re.match."""
    want = next((k for k in keys if re.match(rf"(.*\.)?({k})$", path)), None)
    assert PatternTable("rank_pattern", keys).first(path) == want


@pytest.mark.parametrize("keys,fragment", [
    ([r"(.*?)*(.*?)*(.*?)*\.[a-z]_"], "takes more than 0.1 s"),
    (["(?:a{65535}){65535}"], "repeats too much"),
    (["x" * 257], "longer than 256 characters"),
    (["("], "has an invalid pattern '('"),
    ([""], "keys must be non-empty"),
    ([f"k{i}" for i in range(1025)], "1025 patterns, at most 1024"),
])
def test_bad_patterns_refused(monkeypatch, keys, fragment):
    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 0.1)
    with pytest.raises(AdapterFormatError) as err:
        table = PatternTable("rank_pattern", keys)
        for path in PATHS:
            table.first(path)
    assert str(err.value).startswith("rank_pattern") and fragment in str(err.value), str(err.value)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(target=st.one_of(regex_keys, st.lists(plain_keys, max_size=3), st.sampled_from([r".*(q|v)_proj", "a)|(b"])),
       path=st.one_of(st.sampled_from(PATHS), st.text(alphabet="ab._1q", max_size=9)))
def test_target_modules_equal_peft_check_target_module_exists(target, path):
    if isinstance(target, str):
        try:
            want = re.fullmatch(target, path) is not None
        except re.error:
            with pytest.raises(AdapterFormatError, match="target_modules has an invalid pattern"):
                TargetModules("target_modules", target)
            return
    else:
        want = path in target or any(path.endswith(f".{t}") for t in target)
    assert TargetModules("target_modules", target).matches(path) == want


def test_target_modules_backtracking_is_bounded(monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 0.1)
    matcher = TargetModules("feedforward_modules", r"(.*?)*(.*?)*(.*?)*\.[a-z]_")
    with pytest.raises(AdapterFormatError, match="feedforward_modules: pattern .* takes more than 0.1 s"):
        matcher.matches(PATHS[0])
