"""What every service process is: a FastAPI app that serves ``/metrics`` and ``/health``, owns
the process's publisher and Redis client, and runs its Kafka consumers
(:class:`~dercmd.consumer.BatchConsumer`) for as long as it serves.

A service is its batch handler plus its wiring::

    service = Service("status", settings, settings.status_port)
    service.consume(topics.STATUS, handle)
    service.run()
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import Histogram

from . import metrics, web
from .consumer import BatchConsumer, BatchHandler, InvalidHandler
from .kafka import Publisher, ensure_topics
from .settings import ServiceSettings
from .state.keys import CALL_TIMEOUT_S
from .topics import Topic

log = logging.getLogger(__name__)


def _pack_with_hiredis(client: aioredis.Redis) -> None:
    """Have the client's connections pack commands with hiredis, in C, as redis-py's sync
    connections do; its asyncio ones pack in Python (redis-py 8.1), which was the largest
    single cost in dispatch's and arbitration's profiles (pipelines of script calls). Every
    connection is made after this (the pool makes them when first needed)."""
    pool = client.connection_pool
    base = pool.connection_class
    pool.connection_class = type(base.__name__, (_HiredisPacking, base), {})


class _HiredisPacking:
    def pack_command(self, *args: Any) -> list[bytes]:
        return [_packed(args)]

    def pack_commands(self, commands: Iterable[Sequence[Any]]) -> list[bytes]:
        return [b"".join(map(_packed, commands))]  # a pipeline: one write


def _packed(args: Sequence[Any]) -> bytes:
    command = args[0]
    if " " in command if isinstance(command, str) else b" " in command:
        # "SCRIPT LOAD": the words of a command are separate arguments
        args = (*(command.encode() if isinstance(command, str) else command).split(), *args[1:])
    try:
        return hiredis.pack_command(tuple(args))
    except TypeError:  # bytearray or memoryview, which hiredis does not take
        return hiredis.pack_command(tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args))


async def cancel_all(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel these tasks and wait until they have ended. A cancel is repeated while a task
    goes on: redis-py's asyncio client lets one that lands inside a command go unnoticed (the
    command is shielded; measured with redis-py 8.1, 80 of 200 cancels of a loop of commands),
    and the task would loop on for good."""
    running = [t for t in tasks if t is not None]
    for _ in range(100):  # 20 s at most
        if not (pending := [t for t in running if not t.done()]):
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.2)
    else:
        log.error("tasks did not end when cancelled", extra={"tasks": [t.get_name() for t in running if not t.done()
                                                                         and isinstance(t, asyncio.Task)]})
    await asyncio.gather(*[t for t in running if t.done()], return_exceptions=True)


LOOP_LAG_SECONDS = Histogram(
    "dercmd_event_loop_lag_seconds",
    "How late the service's event loop ran a timer due every 100 ms: time it spent busy before it could.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


async def _watch_loop_lag(period_s: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        LOOP_LAG_SECONDS.observe(max(0.0, loop.time() - due))


class Service:
    def __init__(self, name: str, settings: ServiceSettings, port: int, **fastapi: Any) -> None:
        if not settings.kafka_bootstrap.strip():
            raise SystemExit("DERCMD_KAFKA_BOOTSTRAP is not set (make run sets it for the embedded broker)")
        self.name = name
        self.settings = settings
        self.port = port
        self.publisher = Publisher(settings, source=f"/dercmd/{name}")
        # No per-reply timeout: every call is bounded by CALL_TIMEOUT_S as a whole.
        # redis-py's pool raises MaxConnectionsError past its size (100 by default), which the
        # concurrent deliveries of a mixed fleet reach on a loaded machine. A pool that makes
        # callers wait instead was measured worse (the wait eats into each call's timeout).
        # A restarted Redis leaves the pool's connections dead: each call is tried again on a
        # new connection (every script is safe to repeat), so a restart costs no request.
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url, max_connections=settings.redis_max_connections,
                                                       socket_timeout=None, socket_connect_timeout=5,
                                                       retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4))
        _pack_with_hiredis(self.redis)
        self.consumers: list[BatchConsumer] = []
        #: Awaited at start, before the consumers start (in order).
        self.starters: list[Callable[[], Awaitable[Any]]] = []
        #: Awaited at stop, after the consumers stopped (in order).
        self.closers: list[Callable[[], Awaitable[Any]]] = []
        #: Awaited by /health besides the Redis ping; one that raises makes the service unhealthy.
        self.health_checks: list[Callable[[], Awaitable[Any]]] = []
        self.app = FastAPI(lifespan=self._lifespan, **fastapi)
        web.install_error_envelope(self.app)
        self._add_routes()

    def consume(
        self,
        topic: Topic,
        handler: BatchHandler,
        *,
        on_invalid: InvalidHandler | None = None,
        max_pending: int = 1,
        linger_ms: int = 0,
        max_records: int | None = None,
    ) -> BatchConsumer:
        """Consume ``topic`` in the service's consumer group, batch by batch, while it runs."""
        consumer = BatchConsumer(
            self.settings, topic, f"dercmd-{self.name}", handler, self.publisher, on_invalid=on_invalid,
            max_pending=max_pending, linger_ms=linger_ms, max_records=max_records,
        )
        self.consumers.append(consumer)
        return consumer

    def background(self, name: str, run: Callable[[], Awaitable[Any]]) -> None:
        """Run ``run()`` beside the consumers for as long as the service serves (a poller, a
        sweeper): started after the other start-up work, cancelled first at stop, and
        ``/health`` fails once it has died."""
        task: asyncio.Task[Any] | None = None

        async def start() -> None:
            nonlocal task
            task = asyncio.create_task(run(), name=name)

        async def stop() -> None:
            await cancel_all(task)

        async def check() -> None:
            if task is None or task.done():
                raise RuntimeError(f"{name} stopped")

        self.starters.append(start)
        self.closers.insert(0, stop)
        self.health_checks.append(check)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM, then stop consumers, closers, publisher and Redis."""
        web.serve(self.name, self.app, self.settings, self.port)

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(self.settings)
        await self.publisher.start()
        for start in self.starters:
            await start()
        for consumer in self.consumers:
            await consumer.start()
        # What start-up built (the fleet above all: 100,000 entities are millions of objects)
        # lives as long as the process: keep it out of the collector's full passes.
        gc.freeze()
        lag = asyncio.create_task(_watch_loop_lag(), name="loop lag")
        try:
            yield
        finally:
            lag.cancel()
            for consumer in self.consumers:
                await consumer.stop()
            for close in self.closers:
                await close()
            await self.publisher.stop()
            await self.redis.aclose()

    async def health(self) -> dict[str, Any]:
        """Liveness plus what the service depends on. Unhealthy when a dependency fails, a
        consumer stopped, or a partition has records waiting that nothing gets past."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self.redis.ping()
        for check in self.health_checks:
            await check()
        if not self.publisher.started:
            raise RuntimeError("producer not started")
        stalled: list[str] = []
        for consumer in self.consumers:
            if not consumer.running:
                raise RuntimeError(f"consumer of {consumer.topic.name} stopped")
            stalled += consumer.stalled()
        body: dict[str, Any] = {"status": "ok", "service": self.name}
        if self.consumers:
            body["partitions"] = sum(c.partitions for c in self.consumers)
        if stalled:
            body.update(status="stalled", stalled=stalled)
        return body

    def _add_routes(self) -> None:
        @self.app.get("/metrics", include_in_schema=False)
        async def _metrics() -> Response:
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

        @self.app.get("/health", include_in_schema=False)
        async def _health() -> JSONResponse:
            try:
                body = await self.health()
            except Exception as exc:  # any failed dependency makes the service unhealthy
                return JSONResponse({"status": "unhealthy", "service": self.name, "error": repr(exc)}, status_code=503)
            return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
