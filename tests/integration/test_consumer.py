"""The consumer scaffold every service uses, on the embedded broker, at batch boundaries: a batch
mixing entities, duplicates, poison records, a bug in one record, a failed dependency, a crash
mid-batch, and a partition that makes no progress."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dercmd.consumer import BatchConsumer, Item
from dercmd.events import CommandStatus, StatusEventV1
from dercmd.kafka import DLQ_ERROR, DLQ_TRUNCATED, Publisher, header
from dercmd.settings import Settings
from dercmd.topics import Topic


async def until(probe: Callable[[], Any], deadline_s: float = 30.0, what: str = "condition") -> Any:
    end = asyncio.get_running_loop().time() + deadline_s
    while not (result := probe()):
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def status(command_id: str, entity_id: str, n: int = 0) -> bytes:
    event = StatusEventV1(command_id=command_id, entity_id=entity_id, status=CommandStatus.SENT, detail=str(n))
    return event.model_dump_json(by_alias=True, exclude_none=True).encode()


class Harness:
    """A fresh topic (two partitions) and what it takes to consume it with the scaffold."""

    def __init__(self, bootstrap: str) -> None:
        self.topic = Topic(f"test.consumer.{uuid.uuid4().hex[:8]}", StatusEventV1, "entity id", public=False)
        self.settings = Settings(kafka_bootstrap=bootstrap, stall_after_s=0.5, batch_max_records=500,
                                 kafka_session_timeout_ms=6000, kafka_heartbeat_ms=1000)
        self.publisher = Publisher(self.settings, source="/test")
        self.group = f"test-{uuid.uuid4().hex[:8]}"
        self.consumers: list[BatchConsumer] = []

    async def __aenter__(self) -> Harness:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic.name, 2, 1), NewTopic(self.topic.dlq, 2, 1)])
        finally:
            await admin.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for consumer in self.consumers:
            await consumer.stop(timeout_s=1)
        await self.publisher.stop()

    async def produce(self, records: list[tuple[bytes, bytes]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, max_request_size=2_000_000)
        await producer.start()
        try:
            for key, value in records:
                await producer.send(self.topic.name, value, key=key)
            await producer.flush()
        finally:
            await producer.stop()

    async def consume(self, handler: Callable[[list[Item[Any]]], Awaitable[Any]], **kw: Any) -> BatchConsumer:
        consumer = BatchConsumer(self.settings, self.topic, self.group, handler, self.publisher, **kw)
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def dead_letters(self, count: int) -> list[Any]:
        consumer = AIOKafkaConsumer(self.topic.dlq, bootstrap_servers=self.settings.kafka_bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        records: list[Any] = []
        try:
            end = asyncio.get_running_loop().time() + 20
            while len(records) < count and asyncio.get_running_loop().time() < end:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        finally:
            await consumer.stop()
        return records


async def test_a_batch_mixes_entities_and_keeps_each_entitys_order(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        await h.produce([(f"e{i % 7}".encode(), status(f"c{i}", f"e{i % 7}", i)) for i in range(700)])
        batches: list[list[StatusEventV1]] = []

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            batches.append([item.event for item in items])

        await h.consume(handle)
        await until(lambda: sum(map(len, batches)) >= 700, what="700 records")
        seen = [e for batch in batches for e in batch]
        assert sorted(e.command_id for e in seen) == sorted(f"c{i}" for i in range(700))
        assert max(len(b) for b in batches) > 1  # batches, not records one by one
        assert any(len({e.entity_id for e in b}) > 1 for b in batches)  # a batch mixes entities
        for entity in (f"e{k}" for k in range(7)):
            numbers = [int(e.detail or 0) for e in seen if e.entity_id == entity]
            assert numbers == sorted(numbers), entity  # one entity's records in their order


async def test_poison_records_are_dead_lettered_and_the_good_ones_beside_them_go_on(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        huge = json.dumps({"commandId": "x", "entityId": "e", "status": "Sent", "junk": "y" * 1_048_400}).encode()
        key = b"one-partition"
        await h.produce([(key, status("good-1", "e")), (key, b"\x00 not json"), (key, huge), (key, status("bug", "e")),
                         (key, status("good-1", "e")), (key, status("good-2", "e"))])
        handled: list[str] = []
        invalid: list[int] = []

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            if any(item.event.command_id == "bug" for item in items):
                raise ValueError("a bug that only this record triggers")
            handled.extend(item.event.command_id for item in items)

        async def on_invalid(record: Any, error: Exception) -> None:
            invalid.append(record.offset)

        await h.consume(handle, on_invalid=on_invalid)
        await until(lambda: "good-2" in handled, what="the last good record")
        assert handled == ["good-1", "good-1", "good-2"]  # the duplicate is the handler's to drop
        assert invalid == [1, 2]
        dead = await h.dead_letters(3)
        assert [d.value[:8] for d in dead][:1] == [b"\x00 not json"[:8]]
        assert header(dead[1].headers, DLQ_TRUNCATED) == str(len(huge)) and len(dead[1].value) < 100_000
        assert "a bug that only this record triggers" in (header(dead[2].headers, DLQ_ERROR) or "")


async def test_a_failed_dependency_retries_the_batch_and_a_stalled_partition_shows(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        await h.produce([(b"k", status("c1", "e")), (b"k", status("c2", "e"))])
        redis_up = False
        handled: list[str] = []

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            if not redis_up:
                raise aioredis.ConnectionError("Redis is down")
            handled.extend(item.event.command_id for item in items)

        consumer = await h.consume(handle)
        stalled = await until(consumer.stalled, what="the partition to show as stalled")
        assert stalled and all(p.startswith(h.topic.name) for p in stalled) and handled == []
        redis_up = True
        await until(lambda: handled == ["c1", "c2"], what="the retried batch")
        await until(lambda: not consumer.stalled(), what="the stall to clear")


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_crash_mid_batch_redelivers_it_and_finished_batches_stay_committed(kafka_bootstrap: str, pipelined: bool) -> None:
    async with Harness(kafka_bootstrap) as h:
        key = b"k"
        await h.produce([(key, status("first", "e"))])
        handled: list[tuple[int, str]] = []
        generation = 1
        never = asyncio.Event()

        async def handle(items: list[Item[StatusEventV1]]) -> Any:
            mine = generation

            async def work() -> None:
                if mine == 1 and any(i.event.command_id == "second" for i in items):
                    await never.wait()  # the first process dies before this batch is done
                handled.extend((mine, i.event.command_id) for i in items)

            return work() if pipelined else await work()

        first = await h.consume(handle, max_pending=4 if pipelined else 1)
        await until(lambda: handled == [(1, "first")], what="the first batch")
        await h.produce([(key, status("second", "e"))])
        await until(lambda: any(first.lag().values()), what="the second record to be fetched")
        await first.stop(timeout_s=0.2)  # "crash": the unfinished batch is not committed
        h.consumers.remove(first)

        generation = 2
        await h.consume(handle)
        await until(lambda: (2, "second") in handled, what="the redelivered batch")
        assert handled == [(1, "first"), (2, "second")]  # finished work is not redelivered


async def test_pipelined_work_that_fails_is_replayed_record_by_record_before_its_commit(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        await h.produce([(b"k", status("ok-1", "e")), (b"k", status("bug", "e")), (b"k", status("ok-2", "e"))])
        handled: list[str] = []
        calls: list[int] = []

        async def handle(items: list[Item[StatusEventV1]]) -> Any:
            calls.append(len(items))

            async def work() -> None:
                if any(i.event.command_id == "bug" for i in items):
                    raise ValueError("bug in pipelined work")
                handled.extend(i.event.command_id for i in items)

            return work()

        consumer = await h.consume(handle, max_pending=4)
        await until(lambda: "ok-2" in handled, what="the replayed records")
        assert handled == ["ok-1", "ok-2"] and calls[0] == 3 and calls[1:] == [1, 1, 1]
        (dead,) = await h.dead_letters(1)
        assert "bug in pipelined work" in (header(dead.headers, DLQ_ERROR) or "")
        await until(lambda: not any(consumer.lag().values()), what="the commit past the replayed batch")


async def test_finished_batches_share_a_commit_and_a_stop_commits_what_finished(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        h.settings = h.settings.model_copy(update={"kafka_commit_interval_ms": 3000})
        key = b"k"
        handled: list[str] = []

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            handled.extend(item.event.command_id for item in items)

        consumer = await h.consume(handle)
        await h.produce([(key, status("one", "e"))])
        await until(lambda: handled == ["one"], what="the first batch")
        await until(lambda: consumer.lag() and not any(consumer.lag().values()), what="the first commit")  # at once
        await h.produce([(key, status("two", "e"))])
        await until(lambda: handled == ["one", "two"], what="the second batch")
        # Done, but its commit waits out the interval since the first one.
        assert any(consumer.lag().values())
        await until(lambda: not any(consumer.lag().values()), what="the delayed commit")
        await h.produce([(key, status("three", "e"))])
        await until(lambda: handled == ["one", "two", "three"], what="the third batch")
        await consumer.stop(timeout_s=5)  # within the interval: the stop commits it
        h.consumers.remove(consumer)

        again: list[str] = []

        async def handle_again(items: list[Item[StatusEventV1]]) -> None:
            again.extend(item.event.command_id for item in items)

        await h.produce([(key, status("four", "e"))])
        await h.consume(handle_again)
        await until(lambda: "four" in again, what="the next consumer of the group")
        assert again == ["four"]  # nothing finished before the stop is redelivered


async def test_a_lingering_consumer_takes_what_trickles_in_as_few_batches(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        sizes: list[int] = []

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            sizes.append(len(items))

        await h.consume(handle, linger_ms=1000)
        await h.produce([(b"k", status("warm-up", "e"))])
        await until(lambda: sizes, what="the first batch")
        producer = AIOKafkaProducer(bootstrap_servers=h.settings.kafka_bootstrap)
        await producer.start()
        try:
            for i in range(60):  # one record every 20 ms for 1.2 s
                await producer.send_and_wait(h.topic.name, status(f"c{i}", "e"), key=b"k")
                await asyncio.sleep(0.02)
        finally:
            await producer.stop()
        await until(lambda: sum(sizes) == 61, what="every record")
        # Read as it came, 60 records would be dozens of batches; lingering 1 s between them,
        # a handful.
        assert len(sizes) <= 5, sizes


async def test_no_record_stops_the_consumer_not_even_one_that_breaks_the_on_invalid_hook(kafka_bootstrap: str) -> None:
    """The probe's record: 100,000 ``[`` then 100,000 ``]``. The decoder refuses it, and intake's
    hook, re-reading the raw bytes for an entity to say Rejected to, hit RecursionError: the
    consumer task died, and after a restart died again on the same record."""
    from dercmd.intake.requests_consumer import RequestsHandler

    async with Harness(kafka_bootstrap) as h:
        key = b"one-partition"
        deep = b"[" * 100_000 + b"]" * 100_000
        deep_object = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
        short_deep = b"[" * 40 + b"]" * 40  # scanned only once the decoder has refused it
        await h.produce([(key, deep), (key, deep_object), (key, b"\xff\xfe not utf-8"), (key, short_deep),
                         (key, status("after", "e"))])
        handled: list[str] = []
        hook_errors: list[str] = []
        intake = RequestsHandler(admission=None)  # type: ignore[arg-type]  # not reached: nothing names an entity

        async def on_invalid(record: Any, error: Exception) -> None:
            try:
                await intake.on_invalid(record, error)
            except BaseException as exc:
                hook_errors.append(repr(exc)[:100])
                raise

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            handled.extend(item.event.command_id for item in items)

        consumer = await h.consume(handle, on_invalid=on_invalid)
        await until(lambda: "after" in handled or not consumer.running, what="the record after the poison")
        assert consumer.running and handled == ["after"] and hook_errors == []
        dead = await h.dead_letters(4)
        assert [d.value for d in dead] == [deep[:65_536], deep_object, b"\xff\xfe not utf-8", short_deep]
        assert header(dead[0].headers, DLQ_TRUNCATED) == str(len(deep))
        assert ["deep" in (header(d.headers, DLQ_ERROR) or "") for d in dead] == [True, True, False, True]


async def test_a_hook_that_fails_for_a_record_does_not_stop_the_consumer(kafka_bootstrap: str) -> None:
    async with Harness(kafka_bootstrap) as h:
        await h.produce([(b"k", b"not json"), (b"k", status("after", "e"))])
        handled: list[str] = []

        async def on_invalid(record: Any, error: Exception) -> None:
            raise RuntimeError("a bug in the hook")

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            handled.extend(item.event.command_id for item in items)

        consumer = await h.consume(handle, on_invalid=on_invalid)
        await until(lambda: "after" in handled or not consumer.running, what="the record after the bad one")
        assert consumer.running and handled == ["after"]
        await until(lambda: not any(consumer.lag().values()), what="the commit past it")


async def test_a_failure_a_record_causes_is_logged_with_its_message_clipped(kafka_bootstrap: str,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A handler's exception may echo a value of the record (a 1 MiB entity id): the log line
    keeps its traceback and at most a KiB of its message."""
    async with Harness(kafka_bootstrap) as h:
        await h.produce([(b"k", status("bug", "e")), (b"k", status("after", "e"))])
        handled: list[str] = []

        async def handle(items: list[Item[StatusEventV1]]) -> None:
            if any(item.event.command_id == "bug" for item in items):
                raise ValueError("echoing " + "x" * 1_048_576)
            handled.extend(item.event.command_id for item in items)

        with caplog.at_level("ERROR", logger="dercmd.consumer"):
            await h.consume(handle)
            await until(lambda: "after" in handled, what="the record after the failing one")
        failures = [r for r in caplog.records if r.name == "dercmd.consumer"]
        assert {r.getMessage() for r in failures} >= {"batch failed; replaying it record by record", "record failed"}
        for record in failures:
            assert record.exc_info is None and "in handle" in record.exc  # type: ignore[attr-defined]
            assert all(len(str(v)) < 20_000 for v in vars(record).values()), record.getMessage()
