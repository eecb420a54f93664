"""Kafka plumbing shared by every service: client settings, topic creation, publishing with
CloudEvents headers, decoding, and dead letters.

Services speak plain Kafka and know only a bootstrap address; which broker runs there
(Apache Kafka in compose, the embedded one under ``make run`` and tests) is not their concern.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from prometheus_client import Counter

from . import topics
from .events import Event, dump
from .group import GroupCommit
from .settings import ServiceSettings

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
Headers = list[tuple[str, bytes]]

#: The header names dead letters carry, besides the original record's own headers.
DLQ_ERROR = "dercmd_error"
DLQ_SOURCE = "dercmd_source"  # "<topic>/<partition>/<offset>"
DLQ_TRUNCATED = "dercmd_truncated"  # the original value's length, when the copy is cut short

#: Largest record a producer sends (aiokafka's default max_request_size).
MAX_RECORD_BYTES = 1_048_576
#: A dead letter keeps at most this much of the original value (its length goes in
#: ``dercmd_truncated``): a dead letter is for finding out what went wrong, and a topic of
#: full copies of megabyte records would be a cost an attacker chooses.
DLQ_TRUNCATE_BYTES = 65_536
#: A dead letter keeps the original's headers up to this much in all, none longer than
#: ``DLQ_HEADER_BYTES``; the count of those left out goes in ``dercmd_dropped_headers``.
DLQ_HEADERS_BYTES = 16_384
DLQ_HEADER_BYTES = 1_024
DLQ_DROPPED_HEADERS = "dercmd_dropped_headers"

#: Records no consumer decodes: larger than this (every event is a few hundred bytes; a
#: device report with many measurements a few kilobytes) ...
MAX_VALUE_BYTES = 262_144
#: ... or nested deeper than this (events nest three levels at most).
MAX_DEPTH = 32
#: A consumer scans a value before decoding it only when it is longer than this: a shorter one
#: is safe to hand to the decoder (pydantic's JSON parser stops at 200 levels, and no consumed
#: model takes nested data), and the scan runs on it only if it fails to decode, so that its
#: dead letter says why. Records of every day cost one ``len``.
SCAN_ABOVE_BYTES = 4_096
#: A value taken from a record is echoed in a log line up to this many characters.
LOG_ECHO_CHARS = 1_024

#: Every dead letter, counted where it is written (whatever wrote it: the consumer scaffold
#: for a record that did not parse or whose handler failed, a handler for a refused request).
DEAD_LETTERS = Counter("dercmd_dead_letters_total", "Records copied to a dead-letter topic.", ["topic"])


class PoisonRecord(ValueError):
    """A record refused before decoding: too large, or nested too deep."""


def _string_free(value: bytes) -> bytes:
    """``value`` without its JSON strings (brackets inside them do not nest)."""
    return _STRING.sub(b"", value)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def depth(value: bytes, stop_above: int | None = None) -> int:
    """How deep JSON ``value`` nests (a byte scan, not a parse; strings skipped); for bytes that
    are not JSON, a bound of what a parser would nest. Stops as soon as it passes ``stop_above``."""
    deepest = level = 0
    for bracket in _BRACKETS.findall(_string_free(value)):
        if bracket in (b"[", b"{"):
            level += 1
            if level > deepest:
                deepest = level
                if stop_above is not None and deepest > stop_above:
                    break
        else:
            level -= 1
    return deepest


def check(value: bytes | None, *, max_bytes: int = MAX_VALUE_BYTES, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`PoisonRecord` for a value too large or nested too deep to decode. Costs two
    ``bytes.count`` for a value with few brackets (every event): the byte scan of
    :func:`depth` runs only when there are more opening brackets than ``max_depth``."""
    if value is None:
        return
    if len(value) > max_bytes:
        raise PoisonRecord(f"record value of {len(value)} bytes, more than the {max_bytes} a record may have")
    if value.count(b"[") + value.count(b"{") > max_depth and depth(value, max_depth) > max_depth:
        raise PoisonRecord(f"record value nests more than the {max_depth} levels deep a record may")


def loads(value: bytes | None) -> Any:
    """``json.loads`` for a record's raw bytes that never raises: None for a value that is not
    JSON, too large or nested too deep (for hooks that read what did not decode)."""
    try:
        check(value)
        return json.loads(value or b"")
    except Exception:  # noqa: BLE001 - any value at all: nothing here may stop a consumer
        return None


def clip(value: Any, limit: int = LOG_ECHO_CHARS) -> str:
    """``value`` as text for a log line, cut to ``limit`` characters (its length said)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def producer_kwargs(settings: ServiceSettings) -> dict[str, Any]:
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


def consumer_kwargs(settings: ServiceSettings, group_id: str) -> dict[str, Any]:
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


async def ensure_topics(settings: ServiceSettings) -> None:
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


def ce_headers(event: Event, source: str, time: bytes | None = None) -> Headers:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", event.ce_id().encode()),
        ("ce_type", event.CE_TYPE.encode()),
        ("ce_source", source.encode()),
        ("ce_time", time or datetime.now(UTC).isoformat().encode()),
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


@lru_cache(maxsize=65_536)
def partition_of(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner (murmur2 of the key) picks, as
    aiokafka's does (librdkafka's default, consistent_random, does not: it must be set to
    murmur2_random); cached, because one entity's key comes back again and again."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Publisher:
    """One producer per process. Records for one partition are delivered in the order given.
    ``publish_all`` waits for every ack: use it where another service's event must not
    overtake these.

    Concurrent calls share produce requests (group commit): while one request is out, new
    calls queue, and the next request carries all of them, one batch per partition, in the
    order the calls came. The producer has one request in flight anyway (aiokafka sends one
    per broker at a time, and one batch per partition in each): without this, every call
    cost the broker a request of its own (dispatch's many small publishes above all)."""

    def __init__(self, settings: ServiceSettings, source: str) -> None:
        self._settings = settings
        self.source = source
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._group: GroupCommit[Sequence[tuple[topics.Topic, Event, str]], None] = GroupCommit(self._produce, 10_000)

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

    async def publish(self, topic: topics.Topic, event: Event, key: str) -> None:
        await self.publish_all([(topic, event, key)])

    async def publish_all(self, records: Sequence[tuple[topics.Topic, Event, str]]) -> None:
        """Send records and wait for every ack (with whatever other calls share the request)."""
        if not records:
            return
        await self._group.submit(records)

    async def _produce(self, calls: list[Sequence[tuple[topics.Topic, Event, str]]]) -> list[None]:
        """One produce of every call's records, packed into one batch per partition (aiokafka's
        batch API: no per-record future or metadata look-up); waits for every ack."""
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None
        now = datetime.now(UTC).isoformat().encode()
        counts: dict[str, int] = {}  # asked once per call: a topic may gain partitions
        batches: dict[tuple[str, int], Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for topic, event, key in (record for records in calls for record in records):
            name = topic.name
            count = counts.get(name) or await self._partition_count(name, counts)
            raw_key = key.encode()
            partition = partition_of(raw_key, count)
            value = dump(event)
            headers = ce_headers(event, self.source, now)
            batch = batches.get((name, partition))
            if batch is None:
                batch = batches[(name, partition)] = producer.create_batch()
            if batch.append(key=raw_key, value=value, timestamp=None, headers=headers) is None:
                # Full: send it, and start the partition's next batch with this record.
                futures.append(await producer.send_batch(batch, name, partition=partition))
                batch = batches[(name, partition)] = producer.create_batch()
                if batch.append(key=raw_key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"a record of {len(value)} bytes does not fit in a batch")
        for (name, partition), batch in batches.items():
            futures.append(await producer.send_batch(batch, name, partition=partition))
        await asyncio.gather(*futures)
        return [None] * len(calls)

    async def _partition_count(self, topic: str, counts: dict[str, int]) -> int:
        assert self._producer is not None
        counts[topic] = len(await self._producer.partitions_for(topic))
        return counts[topic]

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
        """Copy an unprocessable record to ``<topic>.dlq`` with the error in its headers, and
        count it. The copy is bounded: the value's first ``DLQ_TRUNCATE_BYTES`` (its length in
        ``dercmd_truncated`` when cut), the key's first KiB, headers up to ``DLQ_HEADERS_BYTES``
        (how many were left out in ``dercmd_dropped_headers``), the error's first 4000 characters;
        so any record that was on a topic fits on its dead-letter topic."""
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        extra = [
            (DLQ_ERROR, error[:4000].encode(errors="replace")),
            (DLQ_SOURCE, f"{topic.name}/{partition}/{offset}".encode()),
        ]
        original: Headers = []
        budget, dropped = DLQ_HEADERS_BYTES, 0
        for name, content in headers or ():
            size = len(name) + len(content or b"")
            if size <= DLQ_HEADER_BYTES and size <= budget:
                original.append((name, content))
                budget -= size
            else:
                dropped += 1
        if dropped:
            extra.append((DLQ_DROPPED_HEADERS, str(dropped).encode()))
        if value is not None and len(value) > DLQ_TRUNCATE_BYTES:
            extra.append((DLQ_TRUNCATED, str(len(value)).encode()))
            value = value[:DLQ_TRUNCATE_BYTES]
        if key is None and value is None:
            key = b""  # a record needs one of them
        await self._producer.send_and_wait(topic.dlq, value, key=key[:1024] if key else key, headers=[*original, *extra])
        DEAD_LETTERS.labels(topic.name).inc()
        log.warning("dead-lettered", extra={"topic": topic.name, "partition": partition, "offset": offset,
                                            "error": clip(error, 500)})

