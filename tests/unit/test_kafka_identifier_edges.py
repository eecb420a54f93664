"""A Kafka request whose ``entityId`` is longer than any entity's (issue 18): ``Rejected`` with
``identifier_too_long`` where the rest of it can be read, dead-lettered only otherwise."""

from __future__ import annotations

import json
from typing import Any

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from dercmd import topics
from dercmd.events import CommandRequestV1, CommandStatus, StatusEventV1
from dercmd.intake.requests_consumer import RequestsHandler


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[topics.Topic, Any, str]] = []

    async def publish_all(self, events: list[tuple[topics.Topic, Any, str]]) -> None:
        self.published.extend(events)


class FakeAdmission:
    def __init__(self) -> None:
        self.publisher = FakePublisher()

    async def known(self, command_ids: list[str]) -> set[str]:
        return set()


def record(value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=topics.REQUESTS.name, partition=0, offset=7, timestamp=0, timestamp_type=0, key=b"k",
                          value=value, checksum=None, serialized_key_size=1, serialized_value_size=len(value), headers=[])


def error_of(value: bytes) -> Exception:
    try:
        CommandRequestV1.model_validate_json(value)
    except ValidationError as exc:
        return exc
    raise AssertionError("valid")


async def test_a_too_long_entity_id_is_rejected_with_its_own_key() -> None:
    admission = FakeAdmission()
    handler = RequestsHandler(admission)  # type: ignore[arg-type]
    value = json.dumps({"id": "long-1", "entityId": "e" * 100_000, "type": "Reset"}).encode()
    await handler.on_invalid(record(value), error_of(value))
    [(topic, event, key)] = admission.publisher.published
    assert topic == topics.STATUS and isinstance(event, StatusEventV1)
    assert (event.command_id, event.status, event.reason) == ("long-1", CommandStatus.REJECTED, "identifier_too_long")
    assert event.detail == "entityId is longer than 128 characters (100000)"
    assert len(event.entity_id) == 128 and event.entity_id.endswith("…") and key == event.entity_id


async def test_an_unreadable_request_is_only_dead_lettered() -> None:
    admission = FakeAdmission()
    handler = RequestsHandler(admission)  # type: ignore[arg-type]
    for value in (b"not json", json.dumps({"entityId": 5}).encode(), json.dumps(["e" * 200]).encode()):
        await handler.on_invalid(record(value), ValueError("invalid"))
    assert admission.publisher.published == []


async def test_a_readable_invalid_request_is_still_invalid_request() -> None:
    admission = FakeAdmission()
    handler = RequestsHandler(admission)  # type: ignore[arg-type]
    value = json.dumps({"id": "bad-1", "entityId": "pv-1", "type": "NoSuchType"}).encode()
    await handler.on_invalid(record(value), error_of(value))
    [(_, event, _)] = admission.publisher.published
    assert (event.entity_id, event.reason) == ("pv-1", "invalid_request")
