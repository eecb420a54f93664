"""No record stops a consumer (issue 18, item 1), on the whole stack.

Bad records go into every topic a service reads (deep nesting, huge strings, invalid UTF-8,
values that are not JSON or not an object, no value at all, huge and many headers, and a wrong
type at every field of every model the topic carries), keyed like the canaries behind them.
Then every canary must end ``Succeeded``, every service must stay up and healthy without a
restart, every bad record must be on its topic's ``.dlq``, and ``dercmd_dead_letters_total``
must count exactly what each dead-letter topic holds.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from dercmd import topics
from dercmd.events import (CommandAcceptedV1, CommandCancelV1, CommandRequestV1, CommandStatus, CommandType,
                           DeliveryCheckV1, DispatchOrderV1, Event, StatusEventV1)
from dercmd.kafka import decode, header
from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import Api, Kafka, inverters_stack

CANARIES = [f"pv-fuzz-{i}" for i in range(6)]
FUZZ = "fuzz-id"  # a header naming each bad record, first so that a dead letter keeps it
NOW = datetime(2026, 12, 8, tzinfo=UTC)


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from inverters_stack(request, tmp_path_factory, CANARIES)


def samples(entity: str) -> dict[str, list[Event]]:
    """A valid event of every model each consumed topic carries (with every field set, so that
    each can be made wrong on its own)."""
    command = f"fuzz-{uuid.uuid4().hex[:8]}"
    fields: dict[str, Any] = {"type": CommandType.LIMIT_FEED_IN, "value": 0}
    return {
        topics.REQUESTS.name: [CommandRequestV1(id=command, entity_id=entity, start_at=NOW, end_at=NOW, expires_at=NOW,
                                                asset_identifiers=("a",), **fields)],
        topics.ACCEPTED.name: [
            CommandAcceptedV1(id=command, entity_id=entity, trigger_time=NOW, end_at=NOW, asset_identifiers=("a",),
                              expires_at=NOW, accepted_at=NOW, source="kafka", **fields),
            CommandCancelV1(command_id=command, entity_id=entity, reason="canceled", by="x", detail="x", at=NOW),
        ],
        topics.ORDERS.name: [
            DispatchOrderV1(command_id=command, entity_id=entity, fence=1, accepted_at=NOW, ordered_at=NOW, start_at=NOW,
                            end_at=NOW, asset_identifiers=("a",), revert_of="x", not_before=NOW, **fields),
            DeliveryCheckV1(command_id=command, entity_id=entity, at=NOW),
        ],
        topics.STATUS.name: [StatusEventV1(command_id=command, entity_id=entity, status=CommandStatus.SENT, reason="x",
                                           detail="x", cooldown_until=NOW, fence=1, superseded_by="x", trigger_time=NOW,
                                           end_at=NOW, **fields)],
    }


WRONG: list[Any] = [{"wrong": [1]}, [None]]  # an object, and a list: no field of these models takes either


def bad_records(topic: topics.Topic) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Every bad record for ``topic``: each one fails to decode (checked here)."""
    out: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def add(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None = None,
            model: type[Event] | None = None) -> None:
        with pytest.raises((ValidationError, ValueError)):
            decode(topic, value, model)
        ce = [("ce_type", model.CE_TYPE.encode())] if model else []
        out.append((key, value, [(FUZZ, uuid.uuid4().hex.encode()), *ce, *(headers or [])]))

    for n, entity in enumerate(CANARIES):
        key = entity.encode()
        generic: list[tuple[bytes | None, list[tuple[str, bytes]]]] = [
            (b"[" * 100_000 + b"]" * 100_000, []),
            (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, []),
            (json.dumps({"entityId": entity, "commandId": "x" * 900_000}).encode(), []),  # huge string
            (json.dumps({"entityId": entity, "detail": "y" * 200_000}).encode()[:-3] + b"\xff\xfe\"}", []),
            (b'{"entityId": "' + entity.encode() + b'", "type": "\xc3\x28"}', []),  # invalid UTF-8
            (b"\x00\x01 not json at all", []),
            (None, []),  # no value (a tombstone)
            (b"", []),
            (b"[]", []), (b"42", []), (b'"a string"', []), (b"null", []), (b"{}", []),
            (b"{}", [("x-huge", b"h" * 500_000)]),  # a huge header
            (b"{}", [(f"x-{i}", b"h" * 900) for i in range(600)]),  # many headers
        ]
        for value, headers in generic[n::len(CANARIES)] if n else generic:  # all on the first key, spread on the others
            add(key, value, headers)
        for model, sample in zip(topic.others and (topic.model, *topic.others) or (topic.model,),
                                 samples(entity)[topic.name], strict=True):
            body = sample.model_dump(mode="json", by_alias=True)
            for name in body:
                for wrong in WRONG if n == 0 else WRONG[:1]:
                    add(key, json.dumps({**body, name: wrong}).encode(), model=model if topic.others else None)
    add(None, b"\xff" * 10)  # no key
    if topic is topics.REQUESTS:  # a valid request under a huge key: refused (the key must be its entity)
        request = CommandRequestV1(id=f"fuzz-{uuid.uuid4().hex[:8]}", entity_id=CANARIES[0], type=CommandType.RESET)
        out.append((b"\xfe" * 900_000, request.model_dump_json(by_alias=True, exclude_none=True).encode(),
                    [(FUZZ, uuid.uuid4().hex.encode())]))
    return out


async def produce(bootstrap: str, records: dict[str, list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        for topic, rs in records.items():
            for key, value, headers in rs:
                await producer.send(topic, value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


def dead_letter_counts(stack: Stack) -> dict[str, float]:
    counts: dict[str, float] = {}
    for name in stack.services:
        text = httpx.get(f"{stack.url(name)}/metrics", timeout=10).text
        for topic, value in re.findall(r'^dercmd_dead_letters_total\{topic="([^"]+)"\} (\S+)$', text, re.MULTILINE):
            counts[topic] = counts.get(topic, 0.0) + float(value)
    return counts


def test_no_record_stops_a_consumer_and_every_dead_letter_is_counted(stack: Stack) -> None:
    api, kafka = Api(stack), Kafka(stack.settings.kafka_bootstrap)
    warm = api.post(CANARIES[0], {"type": "LimitFeedIn", "value": 1}).json()
    assert api.wait_terminal(warm["id"])["status"] == "Succeeded"
    pids = {name: proc.pid for name, proc in stack.procs.items()}

    bad = {topic.name: bad_records(topic) for topic in topics.CONSUMED}
    asyncio.run(produce(stack.settings.kafka_bootstrap, bad))
    canaries = {entity: f"canary-{uuid.uuid4()}" for entity in CANARIES}
    kafka.produce(topics.REQUESTS.name, [
        (entity.encode(), json.dumps({"id": command, "entityId": entity, "type": "LimitFeedIn", "value": 7}).encode(), [])
        for entity, command in canaries.items()
    ])
    for command in canaries.values():
        assert api.wait_terminal(command, deadline_s=60)["status"] == "Succeeded", command

    (hostile,) = [json.loads(v or b"")["id"] for k, v, _ in bad[topics.REQUESTS.name] if k and len(k) > 1024]
    rejected = api.wait_terminal(hostile)
    assert (rejected["status"], rejected["reason"]) == ("Rejected", "key_mismatch") and len(rejected["detail"]) < 1_000
    for topic in topics.CONSUMED:
        expected = {value.decode() for _, _, headers in bad[topic.name] for name, value in headers if name == FUZZ}
        dead = kafka.read_until(topic.dlq, lambda rs, e=expected: e <= {header(r.headers, FUZZ) for r in rs}, deadline_s=60)
        assert all(len(r.value or b"") <= 65_536 for r in dead), topic.name
        wait_for(lambda t=topic.name, n=len(dead): dead_letter_counts(stack).get(t) == n, deadline_s=10,
                 what=f"dercmd_dead_letters_total{{topic={topic.name}}} to be {len(dead)}, what {topic.dlq} holds")
    for name in stack.services:
        health = httpx.get(f"{stack.url(name)}/health", timeout=10)
        assert health.status_code == 200, (name, health.text)
    assert {name: proc.pid for name, proc in stack.procs.items()} == pids  # nothing died and came back
