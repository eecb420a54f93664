"""Offering commands to the stack (Kafka requests or REST calls) and observing what became of
them (the status topic, the simulator's receipts).

Every time is wall-clock seconds since the epoch (``time.time()``), the clock the services
stamp status events with and the simulator stamps receipts with: one machine, one clock.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import httptools
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from dercmd import topics
from dercmd.consumer import pause_for

from . import http1
from .fleetgen import TOKEN, command_type

TERMINAL = frozenset({"Succeeded", "Failed", "Canceled", "Rejected"})
#: The statuses whose time the watcher keeps besides the terminal one.
STAMPED = frozenset({"Pending", "Triggered"})


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def new_command_id(prefix: str, i: int) -> str:
    return f"{prefix}-{i}-{uuid.uuid4().hex[:8]}"


def request_record(command_id: str, entity_id: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A ``dercmd.commands.requests`` record as a user's client produces it: key, value, headers."""
    value = json.dumps({"id": command_id, "entityId": entity_id, "type": command_type(entity_id)}).encode()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", command_id.encode()),
        ("ce_type", b"dercmd.command.request.v1"),
        ("ce_source", b"/dercmd/bench"),
        ("content-type", b"application/json"),
    ]
    return entity_id.encode(), value, headers


def paced(total: int, rate: float, step_s: float) -> Iterator[tuple[float, int]]:
    """(offset in seconds, how many to send then): ``rate`` per second in steps of ``step_s``."""
    sent = 0
    k = 0
    while sent < total:
        due = min(total, int(rate * (k + 1) * step_s + 1e-9))  # 1e-9: 0.07 * 100 is 7, not 6.99..
        if due > sent:
            yield k * step_s, due - sent
            sent = due
        k += 1


@dataclass
class Offered:
    """What one phase offered: command id -> time produced (Kafka: ``send`` called; REST: POST started)."""

    produced_at: dict[str, float] = field(default_factory=dict)
    post_latency_s: list[float] = field(default_factory=list)  # REST only
    post_errors: Counter[str] = field(default_factory=Counter)  # REST only: HTTP status -> count
    first_at: float = 0.0
    last_at: float = 0.0  # last produce acked (Kafka) / last POST answered (REST)


class KafkaLoad:
    """Produces requests with batched ``send`` (never one ``send_and_wait`` per record)."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=5, acks="all", request_timeout_ms=30_000,
            max_batch_size=256 * 1024,
        )

    async def __aenter__(self) -> KafkaLoad:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def _send(self, offered: Offered, command_id: str, entity_id: str) -> None:
        key, value, headers = request_record(command_id, entity_id)
        offered.produced_at[command_id] = time.time()
        await self._producer.send(topics.REQUESTS.name, value, key=key, headers=headers)

    async def burst(self, commands: Sequence[tuple[str, str]]) -> Offered:
        """Every (command id, entity id) as fast as the producer takes them, then flush."""
        offered = Offered(first_at=time.time())
        for command_id, entity_id in commands:
            await self._send(offered, command_id, entity_id)
        await self._producer.flush()
        offered.last_at = time.time()
        return offered

    async def paced(self, commands: Sequence[tuple[str, str]], rate: float, step_s: float) -> Offered:
        """``rate`` commands per second, ``rate * step_s`` every ``step_s``."""
        offered = Offered(first_at=time.time())
        loop = asyncio.get_running_loop()
        start = loop.time()
        it = iter(commands)
        for offset, count in paced(len(commands), rate, step_s):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(count):
                command_id, entity_id = next(it)
                await self._send(offered, command_id, entity_id)
        await self._producer.flush()
        offered.last_at = time.time()
        return offered


class RestLoad:
    """POST /v1/entities/{id}/commands with the fleet's contributor token, at most
    ``concurrency`` requests in flight. The command id is the one intake answers with.

    A lean client (:mod:`.http1`): with 64 requests in flight httpx's connection pool held
    the load to under 100 requests/s, and aiohttp cost the shared 2 cores 0.23 s of CPU per
    1,000 POSTs, so the figure measured the client as much as intake."""

    def __init__(self, api_url: str, concurrency: int) -> None:
        self._api_url = api_url
        self._http: http1.Client | None = None
        self.concurrency = concurrency

    async def __aenter__(self) -> RestLoad:
        self._http = http1.Client(self._api_url, self.concurrency, {"Authorization": f"Bearer {TOKEN}"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            self._http.close()

    async def _post(self, offered: Offered, entity_id: str) -> None:
        assert self._http is not None
        body = json.dumps({"type": command_type(entity_id)}).encode()
        try:
            status, answer, started = await self._http.post_json(f"/v1/entities/{entity_id}/commands", body, timeout_s=30)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            offered.post_errors[type(exc).__name__] += 1
            return
        ended = time.time()
        offered.post_latency_s.append(ended - started)
        offered.last_at = max(offered.last_at, ended)
        if status == 201:
            offered.produced_at[json.loads(answer)["id"]] = started
        else:
            offered.post_errors[str(status)] += 1

    async def burst(self, entity_ids: Sequence[str]) -> Offered:
        offered = Offered(first_at=time.time())
        queue = iter(entity_ids)

        async def worker() -> None:
            for entity_id in queue:  # the workers share one iterator
                await self._post(offered, entity_id)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return offered

    async def paced(self, entity_ids: Sequence[str], rate: float, step_s: float) -> Offered:
        offered = Offered(first_at=time.time())
        loop = asyncio.get_running_loop()
        start = loop.time()
        it = iter(entity_ids)
        tasks: list[asyncio.Task[None]] = []
        for offset, count in paced(len(entity_ids), rate, step_s):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks += [asyncio.create_task(self._post(offered, next(it))) for _ in range(count)]
        await asyncio.gather(*tasks)
        return offered


class StatusWatcher:
    """Reads ``dercmd.commands.status`` from the start for the whole run (a plain consumer,
    no group) and keeps, per command, its first terminal status and that event's ``at``
    (stamped by the service that made the transition), and when it became ``Pending`` and
    ``Triggered`` (for the latency phase's stages)."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topics.STATUS.name, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
            enable_auto_commit=False, fetch_max_wait_ms=100, max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.terminal: dict[str, tuple[str, float]] = {}  # command id -> (status, at)
        self.stamps: dict[str, dict[str, float]] = {}  # command id -> {Pending/Triggered: at}
        self.events = 0
        self._waiting: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._consumer.stop()

    async def _run(self) -> None:
        # The figures come from the events' own times, so the watcher need not read them the
        # moment they are published: it reads every 100 ms (partitions paused in between, so
        # each fetch takes all that came), sparing the shared 2 cores (the embedded broker's
        # cost per fetch grows with the topic's length) for the stack it measures.
        while True:
            await pause_for(self._consumer, 0.1)
            batches = await self._consumer.getmany(timeout_ms=100, max_records=50_000)
            for records in batches.values():
                for record in records:
                    self.events += 1
                    event = json.loads(record.value)
                    status, command_id = event.get("status"), event.get("commandId")
                    if status in STAMPED:
                        self.stamps.setdefault(command_id, {}).setdefault(status, epoch(event["at"]))
                    elif status in TERMINAL and command_id not in self.terminal:
                        self.terminal[command_id] = (status, epoch(event["at"]))
                        self._waiting.discard(command_id)

    async def wait_terminal(self, command_ids: Sequence[str], deadline_s: float) -> int:
        """Until every command has a terminal status or the deadline; returns how many have not."""
        self._waiting = {c for c in command_ids if c not in self.terminal}
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while self._waiting and loop.time() < end:
            if self._task is not None and self._task.done():
                self._task.result()  # the consumer died: raise its error
            await asyncio.sleep(0.1)
        return len(self._waiting)


async def receipts(simulator_url: str, after: int = 0) -> dict[str, list[float]]:
    """Every receipt the simulator recorded after ``after``: command id -> receive times
    (more than one if a device got a command twice)."""
    received: dict[str, list[float]] = {}
    async with httpx.AsyncClient(base_url=simulator_url, timeout=30) as http:
        while True:
            page = (await http.get("/sim/receipts", params={"after": after, "limit": 10_000})).json()
            for r in page["receipts"]:
                received.setdefault(r["commandId"], []).append(epoch(r["receivedAt"]))
            if not page["receipts"]:
                return received
            after = page["next"]


async def receipts_total(simulator_url: str) -> int:
    async with httpx.AsyncClient(base_url=simulator_url, timeout=30) as http:
        return int((await http.get("/sim/received")).json()["total"])
