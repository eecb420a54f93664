from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from dercmd import topics
from dercmd.events import CommandRequestV1, CommandStatus, CommandType, StatusEventV1, dump
from dercmd.kafka import ce_headers, decode


def test_limit_feed_in_needs_a_non_negative_integer() -> None:
    assert CommandRequestV1(entity_id="pv-1", type=CommandType.LIMIT_FEED_IN, value=0).value == 0
    for bad in ({}, {"value": -1}, {"value": 1.5}, {"value": "many"}):
        with pytest.raises(ValidationError):
            CommandRequestV1.model_validate({"entityId": "pv-1", "type": "LimitFeedIn", **bad})


@pytest.mark.parametrize("type_", [t for t in CommandType if t not in (CommandType.LIMIT_FEED_IN, CommandType.LIMIT_PRODUCTION_POWER)])
def test_other_types_take_no_value_and_no_percentage(type_: CommandType) -> None:
    CommandRequestV1(entity_id="x", type=type_)
    with pytest.raises(ValidationError):
        CommandRequestV1(entity_id="x", type=type_, value=5)
    with pytest.raises(ValidationError):
        CommandRequestV1(entity_id="x", type=type_, percentage=50)


def test_limit_production_power_needs_an_integer_percentage_0_to_100() -> None:
    assert CommandRequestV1(entity_id="pv-1", type=CommandType.LIMIT_PRODUCTION_POWER, percentage=0).percentage == 0
    for bad in ({}, {"percentage": -1}, {"percentage": 101}, {"percentage": 50.5}, {"percentage": "50"}, {"value": 5, "percentage": 5}):
        with pytest.raises(ValidationError):
            CommandRequestV1.model_validate({"entityId": "pv-1", "type": "LimitProductionPower", **bad})


def test_requests_refuse_unknown_types_and_fields() -> None:
    with pytest.raises(ValidationError):
        decode(topics.REQUESTS, b'{"entityId": "ev-1", "type": "Explode"}')
    with pytest.raises(ValidationError):
        decode(topics.REQUESTS, b'{"entityId": "ev-1", "type": "StartCharging", "colour": "red"}')


def test_wire_format_is_camel_case_json_and_round_trips() -> None:
    event = StatusEventV1(command_id="c1", entity_id="ev-1", status=CommandStatus.SENT, at=datetime(2026, 1, 1, tzinfo=UTC))
    raw = dump(event)
    assert b'"commandId":"c1"' in raw and b'"entityId":"ev-1"' in raw
    assert decode(topics.STATUS, raw) == event


def test_status_event_id_is_the_same_for_a_re_emitted_transition() -> None:
    a = StatusEventV1(command_id="c1", entity_id="ev-1", status=CommandStatus.SENT)
    b = StatusEventV1(command_id="c1", entity_id="ev-1", status=CommandStatus.SENT)
    c = StatusEventV1(command_id="c1", entity_id="ev-1", status=CommandStatus.SUCCEEDED)
    assert a.event_id == b.event_id != c.event_id


def test_statuses_only_move_forward_and_terminals_are_final() -> None:
    order = [CommandStatus.PENDING, CommandStatus.TRIGGERED, CommandStatus.SENT, CommandStatus.SUCCEEDED]
    assert [s.rank for s in order] == sorted(s.rank for s in order)
    terminal = {s for s in CommandStatus if s.terminal}
    assert terminal == {CommandStatus.SUCCEEDED, CommandStatus.FAILED, CommandStatus.CANCELED, CommandStatus.REJECTED}


def test_cloudevents_binary_headers() -> None:
    event = StatusEventV1(command_id="c1", entity_id="ev-1", status=CommandStatus.SENT)
    headers = dict(ce_headers(event, "/dercmd/test"))
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == b"c1/Sent"  # a re-emitted transition has the same id
    assert headers["ce_type"] == b"dercmd.command.status.v1"
    assert headers["ce_source"] == b"/dercmd/test"
    assert datetime.fromisoformat(headers["ce_time"].decode()).tzinfo is not None
    assert headers["content-type"] == b"application/json"
