"""What every stream-processing service shares: the faust app (with a configurable fetch
wait), its ``/metrics`` and ``/health`` pages, the worker entry point, and the guard every
consumed record passes through (decode or dead-letter; retry infrastructure failures).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import faust
import redis.asyncio as aioredis
import redis.exceptions
import sqlalchemy.exc
from aiokafka.errors import KafkaError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.web import Request, Response, View
from prometheus_client import Counter
from pydantic import ValidationError

from . import logs, metrics
from .events import Event
from .kafka import Publisher, decode, ensure_topics
from .settings import Settings
from .topics import Topic

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

#: Failures of a dependency (broker, Redis, database): the record is retried, never dropped.
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

DEAD_LETTERS = Counter(
    "dercmd_dead_letters_total", "Records copied to a dead-letter topic.", ["topic"]
)


# -- faust with a configurable fetch wait ------------------------------------------------
# faust hard-codes fetch_max_wait_ms=1500 for its consumer, which puts ~400 ms on every hop
# at light load (KAFKA-LOCAL.md). The classes below change only that value.


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this attribute when the consumer starts (pinned: aiokafka<0.15).
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class StreamApp(faust.App):
    """A faust app that owns the service's publisher and Redis client."""

    def __init__(self, service: str, settings: Settings, port: int) -> None:
        hosts = [h.strip() for h in settings.kafka_bootstrap.split(",") if h.strip()]
        if not hosts:
            raise SystemExit("DERCMD_KAFKA_BOOTSTRAP is not set (make run sets it for the embedded broker)")
        super().__init__(
            f"dercmd-{service}",
            broker=[f"kafka://{h}" for h in hosts],
            store="memory://",
            autodiscover=False,
            processing_guarantee="at_least_once",
            topic_partitions=settings.topic_partitions,
            topic_replication_factor=settings.topic_replication,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
            broker_heartbeat_interval=settings.kafka_heartbeat_ms / 1000,
            broker_request_timeout=max(15.0, settings.kafka_session_timeout_ms / 1000 + 5),
            broker_commit_interval=0.5,
            producer_linger=settings.kafka_linger_ms / 1000,
            producer_acks=-1,
            web_enabled=True,
            web_bind=settings.bind_host,
            web_host=settings.bind_host,
            web_port=port,
        )
        self.service = service
        self.settings = settings
        self.fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
        self.publisher = Publisher(settings, source=f"/dercmd/{service}")
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url)
        #: Awaited on stop, after the consumer: backends, database engines, ...
        self.closers: list[Callable[[], Awaitable[Any]]] = []
        #: Awaited by /health besides the Redis ping; one that raises makes the service unhealthy.
        self.health_checks: list[Callable[[], Awaitable[Any]]] = []
        self._add_pages()

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self, loop=self.loop)

    def topic_of(self, topic: Topic) -> Any:
        return self.topic(
            topic.name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=self.settings.topic_partitions,
        )

    async def on_start(self) -> None:
        await ensure_topics(self.settings)
        await self.publisher.start()
        await super().on_start()

    async def on_shutdown(self) -> None:
        # After faust has stopped its agents and web server (mode calls on_shutdown after
        # stopping children), so nothing uses these any more.
        await super().on_shutdown()
        for close in self.closers:
            await close()
        await self.publisher.stop()
        await self.redis.aclose()

    async def health(self) -> dict[str, Any]:
        """Liveness plus what a service depends on; a service may extend it."""
        await self.redis.ping()
        for check in self.health_checks:
            await check()
        return {"status": "ok", "service": self.service, "partitions": len(self.consumer.assignment())}

    def _add_pages(self) -> None:
        app = self

        @self.page("/metrics")
        async def _metrics(view: View, request: Request) -> Response:
            body, content_type = metrics.exposition()
            return view.bytes(body, headers={"Content-Type": content_type})

        @self.page("/health")
        async def _health(view: View, request: Request) -> Response:
            try:
                return view.json(await app.health())
            except Exception as exc:  # any failed dependency makes the service unhealthy
                return view.json({"status": "unhealthy", "service": app.service, "error": repr(exc)}, status=503)

    async def guarded(
        self,
        topic: Topic,
        event: faust.types.EventT,
        handle: Callable[[Any], Awaitable[None]],
    ) -> None:
        await guarded_record(
            self.publisher,
            topic,
            key=event.message.key,
            value=event.message.value,
            headers=event.message.headers,
            partition=event.message.partition,
            offset=event.message.offset,
            handle=handle,
        )


async def guarded_record(
    publisher: Publisher,
    topic: Topic,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    partition: int,
    offset: int,
    handle: Callable[[Any], Awaitable[None]],
    on_invalid: Callable[[bytes | None, Exception], Awaitable[None]] | None = None,
) -> None:
    """Decode a record and handle it, so that no record is lost and none stops the stream.

    - Cannot be parsed: dead-lettered (``on_invalid`` may say more, e.g. a ``Rejected`` event).
    - A dependency failed: retried with backoff until it succeeds; the partition waits,
      because skipping would lose an accepted command.
    - Any other error is a bug for this record: logged and dead-lettered, the stream goes on.
    """
    try:
        event = decode(topic, value)
    except (ValidationError, ValueError) as exc:
        DEAD_LETTERS.labels(topic.name).inc()
        if on_invalid is not None:
            await on_invalid(value, exc)
        await publisher.dead_letter(
            topic, key=key, value=value, headers=headers, error=str(exc), partition=partition, offset=offset
        )
        return
    delay = 0.05
    while True:
        try:
            await handle(event)
            return
        except INFRASTRUCTURE_ERRORS as exc:
            log.warning("dependency failed, retrying", extra={"topic": topic.name, "error": repr(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        except Exception as exc:
            log.exception("record failed", extra={"topic": topic.name, "partition": partition, "offset": offset})
            DEAD_LETTERS.labels(topic.name).inc()
            await publisher.dead_letter(
                topic, key=key, value=value, headers=headers, error=repr(exc), partition=partition, offset=offset
            )
            return


def run_worker(app: StreamApp) -> None:
    """Run a stream service until SIGINT/SIGTERM."""
    worker = faust.Worker(
        app,
        loglevel=app.settings.log_level,
        logging_config=logs.logging_config(app.service, app.settings.log_level),
        quiet=True,
        redirect_stdouts=False,
    )
    worker.execute_from_commandline()
