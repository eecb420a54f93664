"""dispatch's three outcomes on real Redis and a real broker: what the backend did not take is
sent again after a backoff, until its deadline; what it may have taken is asked about, and sent
again only when the backend never got it; a 429 pauses the backend for every replica."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from dercmd.state import keys as redis_keys
from dercmd.consumer import Item
from dercmd.dispatch import backends
from dercmd.dispatch.app import Dispatcher
from dercmd.dispatch.resilience import RateLimiter
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.kafka import ensure_topics
from dercmd.service import Service
from dercmd.settings import Settings

NAME = "test-scripted"


class Scripted:
    """Answers each command's attempts from its script (the last answer repeats), and says what
    became of a command from ``findings``; counts what reached the 'device'."""

    name = NAME
    max_batch = 10
    supported_types = frozenset(CommandType)
    router = None

    def __init__(self) -> None:
        self.scripts: dict[str, list[Any]] = {}
        self.findings: dict[str, backends.Finding] = {}
        self.attempts: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    async def start(self) -> None:
        pass

    async def send(self, deliveries: Sequence[backends.Delivery]) -> list[backends.Accepted | backends.BackendError]:
        answers: list[backends.Accepted | backends.BackendError] = []
        for d in deliveries:
            command = d.order.command_id
            script = self.scripts.get(command, ["ok"])
            answer = script[min(self.attempts[command], len(script) - 1)]
            self.attempts[command] += 1
            if answer == "ok":
                self.received[command] += 1
                answers.append(backends.Accepted(backends.Confirmation.SYNC))
            elif answer == "unknown-acted":
                self.received[command] += 1
                self.findings[command] = backends.Finding.SUCCEEDED
                answers.append(backends.DeliveryUnknown("delivery_unknown", "timeout"))
            elif answer == "unknown-lost":
                self.findings.setdefault(command, backends.Finding.UNKNOWN)
                answers.append(backends.DeliveryUnknown("delivery_unknown", "timeout"))
            else:
                answers.append(backends.NotDelivered("backend_unavailable", "503"))
        return answers

    async def outcomes(self, queries: Sequence[backends.Query]) -> list[backends.CommandOutcome]:
        return [backends.CommandOutcome(self.findings.get(q.command_id, backends.Finding.UNKNOWN)) for q in queries]

    async def aclose(self) -> None:
        pass


SCRIPTED = Scripted()
backends.register(NAME, backends.BackendSettings, backends.Capabilities(SCRIPTED.supported_types))(lambda context: SCRIPTED)
FLEET = Fleet.model_validate({"entities": {**{f"dev-{i}": {"kind": "PV", "vendor": "t", "backend": NAME} for i in range(6)},
                                            "unbuilt": {"kind": "PV", "vendor": "t", "backend": "not-built-here"}}})


def order(command_id: str, entity_id: str, *, fence: int = 1, end_at: datetime | None = None,
          recovered: bool = False) -> Item[DispatchOrderV1]:
    now = datetime.now(UTC)
    event = DispatchOrderV1(command_id=command_id, entity_id=entity_id, type=CommandType.STOP_FEED_IN, fence=fence,
                            accepted_at=now, ordered_at=now, end_at=end_at, recovered=recovered)
    return Item(event, None)  # type: ignore[arg-type]  # dispatch never reads the record


@pytest.fixture
async def dispatcher(redis_url: str, kafka_bootstrap: str) -> AsyncIterator[Dispatcher]:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, dispatch_retry_base_ms=20, dispatch_retry_max_ms=100,
                        dispatch_retry_for_s=2, dispatch_breaker_failures=1000, dispatch_unknown_grace_s=0.05)
    await ensure_topics(settings)
    service = Service("dispatch-test", settings, port=0)
    dispatcher = Dispatcher(service, FLEET)
    await dispatcher.start()
    SCRIPTED.__init__()  # type: ignore[misc]
    yield dispatcher
    await dispatcher.aclose()
    await service.publisher.stop()
    await service.redis.aclose()


async def states(redis_url: str, *pairs: tuple[str, str]) -> list[str]:
    client = aioredis.from_url(redis_url)
    try:
        return [(raw.decode() if (raw := await client.get(redis_keys.delivery(e, c))) else "") for e, c in pairs]
    finally:
        await client.aclose()


async def test_a_command_the_backend_did_not_take_is_sent_again_and_delivered_once(dispatcher: Dispatcher, redis_url: str) -> None:
    SCRIPTED.scripts = {"a": ["503", "503", "ok"], "b": ["unknown-acted"], "c": ["unknown-lost", "ok"]}
    done = await dispatcher.handle([order("a", "dev-0"), order("b", "dev-1"), order("c", "dev-2")])
    await asyncio.wait_for(done, 20)
    assert SCRIPTED.attempts == Counter({"a": 3, "b": 1, "c": 2})  # b was asked about, never sent again
    assert SCRIPTED.received == Counter({"a": 1, "b": 1, "c": 1})
    found = await states(redis_url, ("dev-0", "a"), ("dev-1", "b"), ("dev-2", "c"))
    assert [s.split("|")[0] for s in found] == ["done:Succeeded"] * 3


async def test_a_recovered_order_with_no_delivery_record_is_sent_only_if_the_backend_never_got_it(
    dispatcher: Dispatcher, redis_url: str
) -> None:
    """Recovery announces a command again; Redis has no record of its delivery (it restarted
    empty). The device that has it is not sent it twice; the one that never got it is sent it."""
    SCRIPTED.findings = {"had": backends.Finding.SUCCEEDED}  # delivered before Redis forgot it
    done = await dispatcher.handle([order("had", "dev-0", recovered=True), order("never", "dev-1", recovered=True)])
    await asyncio.wait_for(done, 20)
    assert SCRIPTED.attempts == Counter({"never": 1})
    assert SCRIPTED.received == Counter({"never": 1})
    found = await states(redis_url, ("dev-0", "had"), ("dev-1", "never"))
    assert [s.split("|")[0] for s in found] == ["done:Succeeded"] * 2


async def test_what_is_not_delivered_by_its_deadline_fails_and_a_superseded_one_is_dropped(
    dispatcher: Dispatcher, redis_url: str
) -> None:
    SCRIPTED.scripts = {"late": ["503"], "window": ["503"]}
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    done = await dispatcher.handle([order("late", "dev-3"), order("window", "dev-4", end_at=soon)])
    await asyncio.wait_for(done, 20)
    late, window = await states(redis_url, ("dev-3", "late"), ("dev-4", "window"))
    assert late.startswith("done:Failed|backend_unavailable|not delivered by its deadline")
    assert window.startswith("done:Failed|backend_unavailable")
    assert SCRIPTED.received == Counter()
    assert SCRIPTED.attempts["window"] < SCRIPTED.attempts["late"]  # a window is not retried past its end


async def test_a_retry_of_a_command_superseded_meanwhile_is_never_sent(dispatcher: Dispatcher, redis_url: str) -> None:
    SCRIPTED.scripts = {"old": ["503"]}
    done = await dispatcher.handle([order("old", "dev-5", fence=1)])
    client = aioredis.from_url(redis_url)

    async def retrying() -> bool:
        return (await client.get(redis_keys.delivery("dev-5", "old"))) == b"retry"

    async with asyncio.timeout(10):
        while not await retrying():
            await asyncio.sleep(0.01)
    # Arbitration activates a newer command: the fence moves past the old order's.
    await client.hset(redis_keys.slots("dev-5"), "active_fence", 2)
    await asyncio.wait_for(done, 20)
    await client.aclose()
    assert SCRIPTED.received["old"] == 0
    assert (await states(redis_url, ("dev-5", "old"))) == ["retry"]  # left for arbitration, which reported it Canceled


async def test_a_retry_after_pauses_the_backend_for_every_replica(redis_url: str) -> None:
    redis = aioredis.from_url(redis_url)
    one, other = RateLimiter(redis, "test-paused", 0, 10), RateLimiter(redis, "test-paused", 0, 10)
    await other.acquire()  # it goes by this look for a moment (no round trip per call)...
    await one.pause(0.5)
    started = asyncio.get_running_loop().time()
    await asyncio.sleep(0.15)
    await other.acquire()  # ...then looks again and finds the pause
    assert asyncio.get_running_loop().time() - started >= 0.45
    await redis.aclose()


async def test_the_rate_is_shared(redis_url: str) -> None:
    redis = aioredis.from_url(redis_url)
    limiters = [RateLimiter(redis, "test-rate", 20, 2) for _ in range(2)]
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(limiters[i % 2].acquire() for i in range(12)))
    elapsed = asyncio.get_running_loop().time() - started
    assert elapsed >= 0.4  # 12 calls at 20/s after a burst of 2: at least 0.5 s, whoever calls
    await redis.aclose()


async def test_an_entity_whose_backend_is_not_deployed_fails_truthfully(dispatcher: Dispatcher, redis_url: str) -> None:
    await asyncio.wait_for(await dispatcher.handle([order("nowhere", "unbuilt")]), 20)
    [state] = await states(redis_url, ("unbuilt", "nowhere"))
    assert state.startswith("done:Failed|backend_not_available|no backend 'not-built-here'")


async def test_a_command_superseded_while_its_call_was_out_and_then_not_taken_ends_canceled(
    dispatcher: Dispatcher, redis_url: str
) -> None:
    """While the call is out the command counts as delivered, so arbitration leaves it alone when
    a newer one takes the slot; the backend then did not take it: dispatch ends it Canceled."""
    client = aioredis.from_url(redis_url)
    gate = asyncio.Event()
    send = SCRIPTED.send

    async def held_send(deliveries: Sequence[backends.Delivery]) -> list[backends.Accepted | backends.BackendError]:
        await gate.wait()
        return await send(deliveries)

    SCRIPTED.send = held_send  # type: ignore[method-assign]
    try:
        SCRIPTED.scripts = {"mid": ["503"]}
        done = await dispatcher.handle([order("mid", "dev-2", fence=1)])
        async with asyncio.timeout(10):
            while (await client.get(redis_keys.delivery("dev-2", "mid"))) != b"inflight":
                await asyncio.sleep(0.01)
        await client.hset(redis_keys.slots("dev-2"), "active_fence", 2)  # arbitration: a newer command
        gate.set()
        await asyncio.wait_for(done, 20)
    finally:
        SCRIPTED.send = send  # type: ignore[method-assign]
        await client.aclose()
    [state] = await states(redis_url, ("dev-2", "mid"))
    assert state.startswith("done:Canceled|superseded")
    assert SCRIPTED.received["mid"] == 0
