"""Kafka plumbing shared by every service: client settings, topic creation, publishing with
CloudEvents headers, decoding, and dead letters.

Services speak plain Kafka and know only a bootstrap address; which broker runs there
(Apache Kafka in compose, the embedded one under ``make run`` and tests) is not their concern.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from . import topics
from .events import Event, dump
from .settings import Settings

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
Headers = list[tuple[str, bytes]]

#: The header names dead letters carry, besides the original record's own headers.
DLQ_ERROR = "dercmd_error"
DLQ_SOURCE = "dercmd_source"  # "<topic>/<partition>/<offset>"
DLQ_TRUNCATED = "dercmd_truncated"  # the original value's length, when the copy is cut short

#: Largest record a producer sends (aiokafka's default max_request_size).
MAX_RECORD_BYTES = 1_048_576
#: A dead letter's value is cut to this when the original would not fit in a record.
DLQ_TRUNCATE_BYTES = 65_536


def producer_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "linger_ms": settings.kafka_linger_ms,
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "request_timeout_ms": 15_000,
        "max_request_size": MAX_RECORD_BYTES,
        # Batches of a few hundred records per partition: fewer requests for the broker.
        "max_batch_size": 262_144,
    }


def consumer_kwargs(settings: Settings, group_id: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        # "latest" is unreliable on the embedded broker and wrong for a group's first start:
        # a new group must see what was produced before it joined.
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_ms,
        "request_timeout_ms": max(15_000, settings.kafka_session_timeout_ms + 5_000),
    }


async def ensure_topics(settings: Settings) -> None:
    """Create every topic with the configured partition count; existing ones are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        compacted = {t.name for t in topics.ALL if t.compacted}
        new = [
            NewTopic(
                name,
                settings.topic_partitions,
                settings.topic_replication,
                topic_configs={"cleanup.policy": "compact"} if name in compacted else None,
            )
            for name in topics.all_names()
            if name not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another service created them between list and create
            log.info("topics created", extra={"topics": [t.name for t in new]})
    finally:
        await admin.close()


def ce_headers(event: Event, source: str) -> Headers:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", event.ce_id().encode()),
        ("ce_type", event.CE_TYPE.encode()),
        ("ce_source", source.encode()),
        ("ce_time", datetime.now(UTC).isoformat().encode()),
        ("content-type", b"application/json"),
    ]


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name and value is not None:
            return value.decode(errors="replace")
    return None


def decode(topic: topics.Topic, value: bytes | None, model: type[E] | None = None) -> E:
    """Parse a record value into the topic's model; raises ``pydantic.ValidationError``."""
    if value is None:
        raise ValueError("record has no value")
    return (model or topic.model).model_validate_json(value)  # type: ignore[return-value]


class Publisher:
    """One producer per process. ``send`` queues a record and returns its ack future; records
    for one partition are delivered in the order sent. ``publish`` waits for the ack: use it
    where another service's event must not overtake this one."""

    def __init__(self, settings: Settings, source: str) -> None:
        self._settings = settings
        self.source = source
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(**producer_kwargs(self._settings))
                await producer.start()
                self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def send(self, topic: topics.Topic, event: Event, key: str) -> asyncio.Future[Any]:
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        return await self._producer.send(
            topic.name, dump(event), key=key.encode(), headers=ce_headers(event, self.source)
        )

    async def publish(self, topic: topics.Topic, event: Event, key: str) -> None:
        await (await self.send(topic, event, key))

    async def publish_all(self, records: Sequence[tuple[topics.Topic, Event, str]]) -> None:
        """Send records in order and wait for every ack."""
        futures = [await self.send(topic, event, key) for topic, event, key in records]
        await asyncio.gather(*futures)

    async def dead_letter(
        self,
        topic: topics.Topic,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        error: str,
        partition: int,
        offset: int,
    ) -> None:
        """Copy an unprocessable record to ``<topic>.dlq`` with the error in its headers."""
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        extra = [
            (DLQ_ERROR, error[:4000].encode()),
            (DLQ_SOURCE, f"{topic.name}/{partition}/{offset}".encode()),
        ]
        original = [*(headers or [])]
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") for k, v in [*original, *extra])
        if size > MAX_RECORD_BYTES - 4096:  # room for the record and batch framing
            # The whole copy would be refused for its size, and retrying it forever would
            # stall the partition: keep the start of the value and say how long it was.
            extra.append((DLQ_TRUNCATED, str(len(value or b"")).encode()))
            value = (value or b"")[:DLQ_TRUNCATE_BYTES]
            original = [(k, v) for k, v in original if len(v or b"") <= 1024]
        await self._producer.send_and_wait(topic.dlq, value, key=key[:1024] if key else key, headers=[*original, *extra])
        log.warning("dead-lettered", extra={"topic": topic.name, "partition": partition, "offset": offset, "error": error[:500]})
