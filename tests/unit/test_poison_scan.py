"""The byte scan every record passes before it is decoded, and the never-raising reader that
hooks use on what did not decode (issue 18: one record stopped all Kafka intake for good)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dercmd.events import StatusEventV1
from dercmd.kafka import MAX_DEPTH, MAX_VALUE_BYTES, PoisonRecord, check, clip, depth, loads


def test_ordinary_events_pass() -> None:
    event = StatusEventV1(command_id="c-1", entity_id="ev-1", status="Sent", detail="[[[ {{{ in a string ]]]")
    value = event.model_dump_json(by_alias=True).encode()
    check(value)
    check(None)
    check(b"")
    assert depth(b'{"a": [1, {"b": "]]]}}}"}]}') == 3


@pytest.mark.parametrize("value", [
    b"[" * 100_000 + b"]" * 100_000,  # the probe's record
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b"[" * (MAX_DEPTH + 1),  # not even JSON: still refused unparsed
    b'{"s": "' + b"x" * 10 + b'", "n": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
])
def test_too_deep_is_refused_before_any_parse(value: bytes) -> None:
    with pytest.raises(PoisonRecord, match="deep"):
        check(value)
    assert loads(value) is None


def test_brackets_inside_strings_do_not_count_and_escaped_quotes_do_not_end_them() -> None:
    value = json.dumps({"detail": "[" * 500 + '\\" {' * 100}).encode()
    check(value)
    assert loads(value) == json.loads(value)


def test_too_large_is_refused_before_any_parse() -> None:
    value = json.dumps({"entityId": "x" * MAX_VALUE_BYTES}).encode()
    with pytest.raises(PoisonRecord, match="bytes"):
        check(value)
    assert loads(value) is None


@pytest.mark.parametrize("value", [None, b"", b"\xff\xfe", b"not json", b'{"a": ', b"\x00"])
def test_loads_never_raises(value: bytes | None) -> None:
    assert loads(value) is None


def test_clip_bounds_what_a_log_line_echoes() -> None:
    assert clip("short") == "short"
    clipped = clip("x" * 1_048_576)
    assert len(clipped) < 1_100 and clipped.endswith("(1048576 characters)")


def _true_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_true_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_true_depth(v) for v in value), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('ab[]{}"\\,:\u00e9\n')),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k[{"\\'), inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_the_scan_measures_what_a_parser_would_nest(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert depth(raw) == _true_depth(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2_000))
def test_loads_and_check_never_raise_anything_but_their_refusal(raw: bytes) -> None:
    loads(raw)
    try:
        check(raw, max_depth=3)
    except PoisonRecord:
        pass
