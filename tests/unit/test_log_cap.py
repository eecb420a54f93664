"""Log lines cap every echoed value (issue 18): no request can make a megabyte log line."""

from __future__ import annotations

import json
import logging

from dercmd import logs


def _line(msg: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("dercmd.test", logging.WARNING, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return json.loads(logs.JsonFormatter("intake").format(record))


def test_a_huge_field_and_message_are_cut_with_a_marker() -> None:
    huge = "x" * 1_048_576
    line = _line(huge, entity_id=huge, errors=[{"loc": ["path", "entityId"], "input": huge}])
    assert len(json.dumps(line)) < 4 * logs.MAX_FIELD + 1000
    assert line["entity_id"] == "x" * logs.MAX_FIELD + f"…[cut {1_048_576 - logs.MAX_FIELD} chars]"
    assert str(line["msg"]).endswith(f"…[cut {1_048_576 - logs.MAX_FIELD} chars]")
    assert str(line["errors"]).startswith('[{"loc": ["path", "entityId"]')
    assert "…[cut " in str(line["errors"])


def test_short_values_are_written_as_they_are() -> None:
    line = _line("accepted", command_id="c-1", entity_id="pv-1", attempt=2, ok=True, nothing=None, ids=["a", "b"])
    assert line["msg"] == "accepted"
    assert (line["command_id"], line["entity_id"], line["attempt"], line["ok"], line["nothing"], line["ids"]) == (
        "c-1", "pv-1", 2, True, None, ["a", "b"])


def test_a_long_traceback_keeps_its_end() -> None:
    try:
        raise ValueError("y" * 100_000)
    except ValueError:
        import sys

        record = logging.LogRecord("dercmd.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(logs.JsonFormatter("intake").format(record))
    assert str(line["exc"]).startswith("…[cut ")
    assert str(line["exc"]).endswith("y" * 100)
    assert len(str(line["exc"])) < logs.MAX_EXC + 100
