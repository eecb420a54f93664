"""The one way every service consumes Kafka: micro-batches, with a record guard, dead letters,
ordered commits, stall detection and a graceful stop.

A service gives a topic and a batch handler; :class:`BatchConsumer` does the rest:

1. ``getmany``: what the assigned partitions have, up to ``DERCMD_BATCH_MAX_RECORDS`` records,
   waiting at most ``DERCMD_KAFKA_FETCH_MAX_WAIT_MS`` for the first.
2. Each record is decoded into its topic's model; one that does not parse is dead-lettered
   (``<topic>.dlq``, the error in headers) and never reaches the handler. No record can stop
   the consumer: one too large or nested too deep (:func:`dercmd.kafka.check`, a byte scan
   before any parse of a long record, after a failed one of a short record) is refused
   unparsed, any exception in decoding or in the ``on_invalid`` hook is caught, and the dead
   letter is a bounded copy (:meth:`Publisher.dead_letter`).
3. The handler gets the decoded records of the batch, in partition order (every topic is
   keyed by entity, so one entity's records arrive in their order). It does one Redis round
   trip, one ledger transaction and one produce-and-acknowledge for the whole batch.
4. Offsets are committed after the handler is done (in the background, at most every
   ``DERCMD_KAFKA_COMMIT_INTERVAL_MS``), so a crash redelivers the batch; every handler is
   idempotent (it dedupes by command id, event id or fence).

A consumer off the latency path may linger (``linger_ms``): after a small batch its partitions
pause for a while, so the next fetch takes what came meanwhile as one bigger batch.

Failures: a dependency that fails (broker, Redis, database) retries the whole batch with
backoff and the partitions wait, because skipping would lose an accepted command. Any other
error is a bug for some record: the batch is replayed one record at a time, the record that
fails again is dead-lettered, and the rest go on.

Pipelining: a handler may return an awaitable instead of finishing the work itself (dispatch
does, so a slow backend does not hold the next batch). The consumer then fetches on, up to
``max_pending`` batches, and commits a batch's offsets only once it and every batch before it
have finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import sqlalchemy.exc
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from pydantic import ValidationError

from .events import Event
from .kafka import DEAD_LETTERS, SCAN_ABOVE_BYTES, PoisonRecord, Publisher, check, clip, consumer_kwargs, decode, header
from .metrics import LATENCY_BUCKETS
from .settings import ServiceSettings
from .topics import Topic

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

#: Failures of a dependency (broker, Redis, database): the batch is retried, never dropped.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    KafkaError,
    aioredis.ConnectionError,
    aioredis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during failover
    redis.exceptions.BusyLoadingError,  # a restarted Redis loading its data
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # connection pool exhausted
    OSError,
    asyncio.TimeoutError,
)

BATCHES = Counter("dercmd_consumer_batches_total", "Batches handled, by topic.", ["topic"])
RECORDS = Counter("dercmd_consumer_records_total", "Records consumed, by topic.", ["topic"])
REWOUND = Counter("dercmd_consumer_rewound_partitions_total",
                  "Partitions read again from the beginning because their log ended before the consumer's position.", ["topic"])
RETRIES = Counter("dercmd_retries_total", "Work retried because a dependency failed, by what (a topic, or a stage).", ["what"])
BATCH_SECONDS = Histogram(
    "dercmd_consumer_batch_seconds", "Time to handle one batch (to its commit), by topic.", ["topic"], buckets=LATENCY_BUCKETS
)


@dataclass(frozen=True, slots=True)
class Item(Generic[E]):
    """A decoded record and where it came from."""

    event: E
    record: ConsumerRecord


#: Handles a batch. Returns None when done, or an awaitable that is done when the work is.
BatchHandler = Callable[[list[Item[Any]]], Awaitable[Awaitable[None] | None]]
#: Told about a record that did not parse (after it is dead-lettered), e.g. to say Rejected.
InvalidHandler = Callable[[ConsumerRecord, Exception], Awaitable[None]]


def failure(exc: BaseException | None) -> dict[str, str]:
    """Log fields for an exception a record may have caused: its traceback, with the message
    (which may echo a value from the record) clipped to ``LOG_ECHO_CHARS``; where
    ``log.exception`` would print the whole message, however long."""
    if exc is None:
        return {}
    message = clip(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
    return {"error": message, "exc": "".join(traceback.format_tb(exc.__traceback__, limit=-40)) + message}


async def retrying(call: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Await ``call()`` until no dependency fails (backoff from 50 ms to 5 s); other errors
    propagate. Only for idempotent work."""
    delay = 0.05
    while True:
        try:
            return await call()
        except INFRASTRUCTURE_ERRORS as exc:
            RETRIES.labels(what).inc()
            log.warning("dependency failed, retrying", extra={"what": what, "error": repr(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def pause_for(consumer: AIOKafkaConsumer, seconds: float) -> None:
    """Keep the consumer's partitions from fetching for ``seconds``: the next fetch then takes
    everything that came meanwhile (one request, one batch) instead of whatever trickled in."""
    paused = consumer.assignment()
    consumer.pause(*paused)
    try:
        await asyncio.sleep(seconds)
    finally:
        assigned = consumer.assignment()  # a rebalance meanwhile unpauses what it hands out
        consumer.resume(*(tp for tp in paused if tp in assigned))


class _Progress:
    """Where a partition's commits stand, for stall detection. ``since`` is when the
    committed offset last moved (or when the partition was assigned)."""

    __slots__ = ("committed", "since")

    def __init__(self, committed: int) -> None:
        self.committed = committed
        self.since = time.monotonic()


class BatchConsumer(ConsumerRebalanceListener):
    def __init__(
        self,
        settings: ServiceSettings,
        topic: Topic,
        group_id: str,
        handler: BatchHandler,
        publisher: Publisher,
        *,
        on_invalid: InvalidHandler | None = None,
        max_pending: int = 1,
        linger_ms: int = 0,
        max_records: int | None = None,
    ) -> None:
        self.topic = topic
        self._handler = handler
        self._publisher = publisher
        self._on_invalid = on_invalid
        self._max_records = max_records or settings.batch_max_records
        self._wait_ms = settings.kafka_fetch_max_wait_ms
        self._stall_after_s = settings.stall_after_s
        self._commit_interval_s = settings.kafka_commit_interval_ms / 1000
        self._last_commit = 0.0
        #: Set while draining (a stop, a rebalance): commit what finished without waiting.
        self._hurry = asyncio.Event()
        self._max_pending = max_pending
        self._linger_s = linger_ms / 1000
        self._kwargs = consumer_kwargs(settings, group_id)
        self._consumer: AIOKafkaConsumer = None  # type: ignore[assignment]  # made in start(): it needs the loop
        self._task: asyncio.Task[None] | None = None
        # Batches handed to the handler and not yet committed, oldest first.
        # Guarded by being touched only from the event loop (no awaits between read and pop).
        self._pending: deque[tuple[dict[TopicPartition, int], asyncio.Future[Any], list[Item[Any]]]] = deque()
        self._progress: dict[TopicPartition, _Progress] = {}
        self._committer: asyncio.Future[None] | None = None
        #: Offsets of finished batches not committed yet (the committer takes them).
        self._ready: dict[TopicPartition, int] = {}
        _LIVE.add(self)
        # Counters that alerts watch start at 0, so their first increment shows as an increase.
        DEAD_LETTERS.labels(topic.name)
        REWOUND.labels(topic.name)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**self._kwargs)
        await self._consumer.start()
        # Subscribed after start, so that start does not wait for the group to hand out
        # partitions: after a kill -9 that waits out the dead member's session, and a
        # service (intake's REST API) would not serve meanwhile. /health shows the partitions.
        self._consumer.subscribe([self.topic.name], listener=self)
        self._task = asyncio.create_task(self._run(), name=f"consume {self.topic.name}")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop fetching, let handed-out batches finish (up to ``timeout_s``), commit, leave.
        Work still unfinished then is cancelled uncommitted, as a crash would leave it: the
        next owner of the partition gets those records again."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        _LIVE.discard(self)
        if self._consumer is None:
            return
        await self._drain(timeout_s)
        await self._consumer.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def partitions(self) -> int:
        return len(self._consumer.assignment()) if self._consumer is not None else 0

    def topic_partitions(self) -> int | None:
        """How many partitions the topic has, as the cluster's metadata says (None: unknown yet)."""
        found = self._consumer.partitions_for_topic(self.topic.name) if self._consumer is not None else None
        return len(found) if found else None

    # -- rebalance listener (awaited by aiokafka before partitions change hands) ------------

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Finish and commit what we handed out, so the next owner starts after it; what does
        # not finish in time is cancelled, and the next owner (aiokafka revokes every
        # partition on a rebalance, so perhaps this consumer again) starts at its records.
        await self._drain(timeout_s=5.0)
        for tp in revoked:
            self._progress.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        for tp in assigned:
            try:
                committed = await self._consumer.committed(tp)
            except KafkaError:
                committed = None
            self._progress[tp] = _Progress(committed or 0)

    async def group_offsets(self) -> tuple[dict[int, int], dict[int, int]] | None:
        """The whole group's progress, not only this member's: per partition of the topic,
        its committed offset (0 if none) and the log's end; None while the topic's partitions
        are not known yet."""
        partitions = self._consumer.partitions_for_topic(self.topic.name) if self._consumer is not None else None
        if not partitions:
            return None
        tps = [TopicPartition(self.topic.name, p) for p in sorted(partitions)]
        ends = await self._consumer.end_offsets(tps)
        committed = await asyncio.gather(*(self._consumer.committed(tp) for tp in tps))
        return ({tp.partition: c or 0 for tp, c in zip(tps, committed, strict=True)},
                {tp.partition: ends[tp] for tp in tps})

    # -- health ------------------------------------------------------------------------

    def lag(self) -> dict[TopicPartition, int]:
        """Records after the committed offset, per assigned partition (as far as known)."""
        out: dict[TopicPartition, int] = {}
        for tp, progress in list(self._progress.items()):
            high = self._consumer.highwater(tp)
            if high is not None:
                out[tp] = max(0, high - progress.committed)
        return out

    def stalled(self) -> list[str]:
        """Partitions that have records waiting and whose commits have not moved for
        ``DERCMD_STALL_AFTER_S``: a dependency down, or a record nothing gets past."""
        self._observe()
        now = time.monotonic()
        lag = self.lag()
        return [
            f"{tp.topic}/{tp.partition}"
            for tp, progress in list(self._progress.items())
            if lag.get(tp, 0) > 0 and now - progress.since > self._stall_after_s
        ]

    def _observe(self) -> None:
        """A partition with nothing after its commit is not stalled: restart its clock."""
        now = time.monotonic()
        lag = self.lag()
        for tp, progress in list(self._progress.items()):
            if lag.get(tp, 0) == 0:
                progress.since = now

    # -- the loop ----------------------------------------------------------------------

    async def _rewind_truncated(self) -> None:
        """A partition whose log ends before where this consumer stands lost its records: a
        broker that keeps nothing (the embedded one) came back empty, or an unclean leader
        election. The broker answers such a fetch with nothing at all, so the consumer would
        wait until the new log grew past its old offset, skipping everything on the way:
        start it again from the log's beginning (every handler tolerates a record twice; the
        ledger's recovery drives on what the lost records carried)."""
        for tp in list(self._progress):
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except (KafkaError, IllegalStateError):
                continue
            if position > high:
                log.warning("partition log truncated; reading it from the beginning",
                            extra={"topic": tp.topic, "partition": tp.partition, "position": position, "log_end": high})
                REWOUND.labels(tp.topic).inc()
                await self._consumer.seek_to_beginning(tp)
                self._progress[tp] = _Progress(0)

    async def _run(self) -> None:
        checked = 0.0
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=max(self._wait_ms, 100), max_records=self._max_records)
                if time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    await self._rewind_truncated()
            except KafkaError as exc:
                log.warning("fetch failed, retrying", extra={"topic": self.topic.name, "error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            self._observe()
            if not batches:
                continue
            started = time.perf_counter()
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
            records = [r for rs in batches.values() for r in rs]
            RECORDS.labels(self.topic.name).inc(len(records))
            items = await self._decode(records)
            done = await self._guarded(items)
            self._pending.append((offsets, done, items))
            done.add_done_callback(lambda _f, t=started: self._finished(t))
            BATCHES.labels(self.topic.name).inc()
            while len(self._pending) >= self._max_pending:
                await asyncio.wait([self._pending[0][1]])
            if self._linger_s and len(records) < self._max_records:
                await self._linger(started)

    async def _linger(self, started: float) -> None:
        """Let records gather until ``linger_ms`` after the batch started: the partitions are
        paused meanwhile, so the next fetch takes everything that came (one request, one
        batch) instead of whatever trickled in since the last one. For consumers off the
        latency path (status), where a bigger batch is cheaper per record."""
        rest = self._linger_s - (time.perf_counter() - started)
        if rest > 0:
            await pause_for(self._consumer, rest)

    async def _decode(self, records: Sequence[ConsumerRecord]) -> list[Item[Any]]:
        items: list[Item[Any]] = []
        for record in records:
            try:
                if record.value is not None and len(record.value) > SCAN_ABOVE_BYTES:
                    check(record.value)
                model = self.topic.model_of(header(record.headers, "ce_type")) if self.topic.others else None
                items.append(Item(decode(self.topic, record.value, model), record))
            except Exception as exc:  # noqa: BLE001 - whatever a record holds, it must not stop the consumer
                await self._invalid(record, exc)
        return items

    async def _invalid(self, record: ConsumerRecord, exc: Exception) -> None:
        """A record that did not decode: dead-letter it, then tell the ``on_invalid`` hook; a hook
        that fails for it (other than a dependency, which is retried) is logged and passed over."""
        if not isinstance(exc, PoisonRecord):
            try:
                check(record.value)  # a short record that nests too deep: say so
            except PoisonRecord as poison:
                exc = poison
        error = str(exc) if isinstance(exc, (ValidationError, ValueError)) else repr(exc)
        await self._dead_letter(record, error)
        if self._on_invalid is None:
            return
        try:
            await self._retrying(lambda: self._on_invalid(record, exc))  # type: ignore[misc]
        except Exception as hook_error:  # noqa: BLE001
            log.error("on_invalid failed for a dead-lettered record", extra={
                "topic": self.topic.name, "partition": record.partition, "offset": record.offset,
                "error": clip(repr(hook_error), 500)})

    async def _guarded(self, items: list[Item[Any]]) -> asyncio.Future[Any]:
        """Run the handler on the batch: retry it while a dependency fails; on any other error
        replay the batch record by record and dead-letter the record that fails."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not items:
            done.set_result(None)
            return done
        try:
            result = await self._retrying(lambda: self._handler(items))
        except Exception as exc:
            log.error("batch failed; replaying it record by record",
                      extra={"topic": self.topic.name, "records": len(items), **failure(exc)})
            await self._replay(items)
            done.set_result(None)
            return done
        if result is None:
            done.set_result(None)
            return done
        return asyncio.ensure_future(result)

    async def _replay(self, items: list[Item[Any]]) -> None:
        """Handle records one at a time (handlers are idempotent); dead-letter any that fails."""
        for item in items:
            try:
                result = await self._retrying(lambda i=item: self._handler([i]))  # type: ignore[misc]
                if result is not None:
                    await result
            except Exception as exc:
                log.error("record failed", extra={"topic": self.topic.name, "partition": item.record.partition,
                                                  "offset": item.record.offset, **failure(exc)})
                await self._dead_letter(item.record, repr(exc))

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await retrying(call, self.topic.name)

    async def _dead_letter(self, record: ConsumerRecord, error: str) -> None:
        """Copy the record to the dead-letter topic (counted there). A dependency that fails is
        retried; if the copy fails otherwise, a bare one (no key, headers or value) is tried,
        and if that fails too the record is logged and passed over: nothing stops the partition."""
        copy: dict[str, Any] = {"key": record.key, "value": record.value, "headers": record.headers}
        for attempt in ("copy", "bare"):
            try:
                await self._retrying(
                    lambda: self._publisher.dead_letter(
                        self.topic, error=error, partition=record.partition, offset=record.offset, **copy,
                    )
                )
                return
            except Exception as exc:  # noqa: BLE001
                log.error("dead letter refused", extra={
                    "topic": self.topic.name, "partition": record.partition, "offset": record.offset,
                    "attempt": attempt, "error": clip(repr(exc), 500)})
                copy = {"key": b"", "value": None, "headers": None}

    # -- commits -----------------------------------------------------------------------

    def _finished(self, started: float | None = None) -> None:
        """A batch is done: its offsets, and those of every finished batch before it, are
        ready to commit. Committed in the background, so the next batch does not wait for it,
        and at most every ``DERCMD_KAFKA_COMMIT_INTERVAL_MS``: under load one commit covers
        several batches (each commit is a request the broker serves)."""
        if started is not None:
            BATCH_SECONDS.labels(self.topic.name).observe(time.perf_counter() - started)
        self._ready.update(self._finished_offsets())
        if self._ready and (self._committer is None or self._committer.done()):
            self._committer = asyncio.ensure_future(self._commit_finished())

    async def _commit_finished(self) -> None:
        """Commit the ready offsets. One commit at a time (the ``_committer`` task), so
        offsets only move forward."""
        while self._ready:
            wait_s = self._last_commit + self._commit_interval_s - time.monotonic()
            if wait_s > 0 and not self._hurry.is_set():
                try:
                    await asyncio.wait_for(self._hurry.wait(), wait_s)
                except TimeoutError:
                    pass
            assigned = self._consumer.assignment()
            offsets = {tp: o for tp, o in self._ready.items() if tp in assigned}
            self._ready = {}
            self._last_commit = time.monotonic()
            if offsets:
                await self._commit(offsets)

    def _finished_offsets(self) -> dict[TopicPartition, int]:
        """Take the finished batches off the head of the queue; their offsets."""
        offsets: dict[TopicPartition, int] = {}
        while self._pending and self._pending[0][1].done():
            batch_offsets, done, items = self._pending[0]
            if done.cancelled():
                break  # abandoned work: never committed (a drain clears it)
            if done.exception() is not None:
                # Pipelined work that raised: replay its records one by one before its offsets
                # may be committed (nothing accepted may be skipped).
                log.error("pipelined batch failed; replaying it", extra={"topic": self.topic.name, **failure(done.exception())})
                replay = asyncio.ensure_future(self._replay(items))
                replay.add_done_callback(lambda _f: self._finished())
                self._pending[0] = (batch_offsets, replay, items)
                break
            self._pending.popleft()
            offsets.update(batch_offsets)
        return offsets

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another consumer: it starts from the last commit and
            # redelivers these records, which every handler tolerates.
            log.warning("commit refused after a rebalance", extra={"topic": self.topic.name, "error": repr(exc)})
            return
        except KafkaError as exc:
            log.warning("commit failed; the next one covers it", extra={"topic": self.topic.name, "error": repr(exc)})
            return
        now = time.monotonic()
        for tp, offset in offsets.items():
            progress = self._progress.get(tp)
            if progress is not None and offset != progress.committed:
                progress.committed = offset
                progress.since = now

    async def _drain(self, timeout_s: float) -> None:
        """Let handed-out batches finish for up to ``timeout_s`` and commit them; cancel the
        rest uncommitted, as a crash would leave them (handlers are idempotent). Commits go
        through the one committer task, so offsets only move forward; a broker that does not
        answer delays this by ``timeout_s`` at most once more."""
        end = asyncio.get_running_loop().time() + timeout_s
        if self._pending:
            await asyncio.wait([f for _, f, _ in self._pending], timeout=timeout_s)
        self._hurry.set()  # commit what finished now, not after the interval
        try:
            self._finished()
            for _ in range(2):  # a replay may start while committing; give it the same deadline
                if self._committer is not None and not self._committer.done():
                    await asyncio.wait([self._committer], timeout=max(0.0, end - asyncio.get_running_loop().time()) + 1.0)
                if not (self._pending and self._pending[0][1].done()) and not self._ready:
                    break
                self._finished()
        finally:
            self._hurry.clear()
        for _, unfinished, _ in self._pending:
            unfinished.cancel()
        self._pending.clear()
        self._ready = {}  # not committed in time: redelivered to whoever owns them next


# -- the lag and stall gauges, read at scrape time -----------------------------------------

_LIVE: set[BatchConsumer] = set()


class _ConsumerCollector(Collector):
    def collect(self) -> Any:
        lag = GaugeMetricFamily("dercmd_consumer_lag_records", "Records after the committed offset, by topic.", labels=["topic"])
        stalled = GaugeMetricFamily(
            "dercmd_consumer_stalled_partitions",
            "Partitions with records waiting whose commits have not moved for DERCMD_STALL_AFTER_S, by topic.",
            labels=["topic"],
        )
        for consumer in list(_LIVE):
            lag.add_metric([consumer.topic.name], sum(consumer.lag().values()))
            stalled.add_metric([consumer.topic.name], len(consumer.stalled()))
        yield lag
        yield stalled


REGISTRY.register(_ConsumerCollector())
