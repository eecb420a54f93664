"""Kafka plumbing on the embedded broker: topic creation, CloudEvents headers, dead letters."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from dercmd import topics
from dercmd.events import CommandStatus, StatusEventV1
from dercmd.kafka import DLQ_ERROR, DLQ_SOURCE, DLQ_TRUNCATED, Publisher, decode, ensure_topics, header
from dercmd.settings import Settings


async def read_all(bootstrap: str, topic: str, count: int) -> list:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=10_000)
            if not batch:
                break
            for rs in batch.values():
                records.extend(rs)
    finally:
        await consumer.stop()
    return records


async def read_keyed(bootstrap: str, topic: str, key: bytes, count: int) -> list:  # type: ignore[type-arg]
    """The first ``count`` records with this key, from the start of the topic."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records = []
    try:
        end = asyncio.get_running_loop().time() + 30
        while len(records) < count and asyncio.get_running_loop().time() < end:
            for rs in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(r for r in rs if r.key == key)
    finally:
        await consumer.stop()
    return records


async def test_topics_are_created_with_the_configured_partitions(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        await admin.delete_topics([name for name in topics.all_names() if name in existing])
        settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_partitions=3)
        await ensure_topics(settings)
        await ensure_topics(settings)  # again: existing topics are left alone
        described = await admin.describe_topics(topics.all_names())
    finally:
        await admin.close()
    partitions = {d["topic"]: len(d["partitions"]) for d in described}
    assert partitions == {name: 3 for name in topics.all_names()}


async def test_published_events_carry_key_and_cloudevents_headers(kafka_bootstrap: str) -> None:
    publisher = Publisher(Settings(kafka_bootstrap=kafka_bootstrap), source="/dercmd/test")
    event = StatusEventV1(command_id="k-1", entity_id="ev-kafka", status=CommandStatus.SENT)
    await publisher.publish(topics.REPORTS, event, "ev-kafka")  # a topic no service consumes
    await publisher.dead_letter(topics.REPORTS, key=b"ev-kafka", value=b"{not json", headers=[("x", b"1")],
                                error="boom", partition=2, offset=7)
    await publisher.stop()
    (record,) = [r for r in await read_all(kafka_bootstrap, topics.REPORTS.name, 1) if r.key == b"ev-kafka"]
    assert decode(topics.STATUS, record.value) == event
    assert header(record.headers, "ce_type") == "dercmd.command.status.v1"
    assert header(record.headers, "ce_source") == "/dercmd/test"
    (dead,) = await read_all(kafka_bootstrap, topics.REPORTS.dlq, 1)
    assert dead.value == b"{not json" and header(dead.headers, "x") == "1"
    assert header(dead.headers, DLQ_ERROR) == "boom"
    assert header(dead.headers, DLQ_SOURCE) == f"{topics.REPORTS.name}/2/7"


async def test_a_dead_letter_too_large_for_a_record_is_kept_truncated(kafka_bootstrap: str) -> None:
    publisher = Publisher(Settings(kafka_bootstrap=kafka_bootstrap), source="/dercmd/test")
    huge = b'{"entityId": "' + b"x" * 1_048_400 + b'"}'
    await publisher.dead_letter(topics.STATE, key=b"big", value=huge, headers=[("ce_id", b"1")],
                                error="too big to parse", partition=0, offset=1)
    await publisher.stop()
    (dead,) = await read_all(kafka_bootstrap, topics.STATE.dlq, 1)
    assert header(dead.headers, DLQ_TRUNCATED) == str(len(huge))
    assert header(dead.headers, DLQ_ERROR) == "too big to parse"
    assert dead.value == huge[: len(dead.value)] and 0 < len(dead.value) < 100_000


async def test_concurrent_publishes_share_produce_requests_and_keep_their_order(kafka_bootstrap: str) -> None:
    publisher = Publisher(Settings(kafka_bootstrap=kafka_bootstrap), source="/dercmd/test")
    await publisher.start()
    batches_sent = 0
    producer = publisher._producer
    assert producer is not None
    send_batch = producer.send_batch

    async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal batches_sent
        batches_sent += 1
        return await send_batch(*args, **kwargs)

    producer.send_batch = counting  # type: ignore[method-assign]
    entity = f"ev-group-{uuid.uuid4().hex[:6]}"
    events = [StatusEventV1(command_id=f"{entity}-{i}", entity_id=entity, status=CommandStatus.SENT) for i in range(100)]
    # 100 callers at once, one record each, all to one partition (one key)
    await asyncio.gather(*(publisher.publish(topics.REPORTS, e, entity) for e in events))
    await publisher.stop()
    records = await read_keyed(kafka_bootstrap, topics.REPORTS.name, entity.encode(), len(events))
    assert [decode(topics.STATUS, r.value).command_id for r in records] == [e.command_id for e in events]
    # one request in flight at a time, and every caller that queued meanwhile shares the next
    assert batches_sent <= 3, batches_sent


async def test_every_dead_letter_is_counted_and_is_a_bounded_copy(kafka_bootstrap: str) -> None:
    """Counted where it is written, so the alert sees a handler's dead letters (intake's refused
    requests) as well as the consumer's; and a record with many headers still fits."""
    from aiokafka.admin import NewTopic

    from dercmd.kafka import DEAD_LETTERS, DLQ_DROPPED_HEADERS, DLQ_TRUNCATE_BYTES

    topic = topics.Topic(f"test.dead.{uuid.uuid4().hex[:8]}", StatusEventV1, "entity id", public=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic.dlq, 1, 1)])
    finally:
        await admin.close()
    before = DEAD_LETTERS.labels(topic.name)._value.get()
    publisher = Publisher(Settings(kafka_bootstrap=kafka_bootstrap), source="/dercmd/test")
    many = [(f"h{i}", b"v" * 900) for i in range(1000)]  # 900 KB of headers, each small
    await publisher.dead_letter(topic, key=b"k" * 5000, value=b"x" * 200_000, headers=many, error="e" * 10_000,
                                partition=0, offset=1)
    await publisher.dead_letter(topic, key=None, value=None, headers=None, error="no value", partition=0, offset=2)
    await publisher.stop()
    first, second = await read_all(kafka_bootstrap, topic.dlq, 2)
    assert DEAD_LETTERS.labels(topic.name)._value.get() - before == 2
    assert first.value == b"x" * DLQ_TRUNCATE_BYTES and header(first.headers, DLQ_TRUNCATED) == "200000"
    assert len(first.key) == 1024 and len(header(first.headers, DLQ_ERROR) or "") == 4000
    kept = [h for h in first.headers if h[0].startswith("h")]
    assert 0 < len(kept) < 1000 and header(first.headers, DLQ_DROPPED_HEADERS) == str(1000 - len(kept))
    assert second.value is None and header(second.headers, DLQ_ERROR) == "no value"
