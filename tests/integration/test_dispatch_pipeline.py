"""dispatch delivers in parallel across entities and in order within one, on a real Redis and
broker, with two backends of which one hangs until the test lets it go."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from dercmd.state import keys as redis_keys
from dercmd.consumer import Item
from dercmd.dispatch import backends
from dercmd.dispatch.app import Dispatcher
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.kafka import ensure_topics
from dercmd.service import Service
from dercmd.settings import Settings

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Recording:
    """A backend that records what it was sent, in order, and answers once its gate is open."""

    max_batch = 100
    supported_types = frozenset(CommandType)
    router = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.gate = asyncio.Event()
        self.sent: list[str] = []

    async def send(self, deliveries: Sequence[backends.Delivery]) -> list[backends.Accepted | backends.BackendError]:
        self.sent += [d.order.command_id for d in deliveries]
        await self.gate.wait()
        return [backends.Accepted(backends.Confirmation.SYNC) for _ in deliveries]

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


SLOW, FAST = Recording("test-slow"), Recording("test-fast")
FAST.gate.set()
backends.register(SLOW.name, backends.BackendSettings, backends.Capabilities(SLOW.supported_types))(lambda context: SLOW)
backends.register(FAST.name, backends.BackendSettings, backends.Capabilities(FAST.supported_types))(lambda context: FAST)

FLEET = Fleet.model_validate({"entities": {
    "slow-1": {"kind": "EV", "vendor": "t", "backend": SLOW.name},
    **{f"fast-{i}": {"kind": "EV", "vendor": "t", "backend": FAST.name} for i in range(3)},
}})


def order(command_id: str, entity_id: str, fence: int = 1) -> Item[DispatchOrderV1]:
    event = DispatchOrderV1(command_id=command_id, entity_id=entity_id, type=CommandType.START_CHARGING,
                            fence=fence, accepted_at=T0, ordered_at=T0)
    return Item(event, None)  # type: ignore[arg-type]  # dispatch never reads the record


async def until(probe: Any, deadline_s: float = 20.0) -> None:
    end = asyncio.get_running_loop().time() + deadline_s
    while not await probe():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_a_hanging_backend_holds_only_its_own_entities_and_each_entity_keeps_its_order(
    redis_url: str, kafka_bootstrap: str
) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url)
    await ensure_topics(settings)
    service = Service("dispatch-test", settings, port=0)
    dispatcher = Dispatcher(service, FLEET)
    client = aioredis.from_url(redis_url)

    async def state(entity_id: str, command_id: str) -> str:
        raw = await client.get(redis_keys.delivery(entity_id, command_id))
        return raw.decode() if raw else ""

    first = asyncio.ensure_future(await dispatcher.handle([order("s-1", "slow-1"), order("f-1", "fast-0"), order("f-2", "fast-1")]))
    # A later batch: the slow entity's next command, the same order again, and a fast entity.
    second = asyncio.ensure_future(
        await dispatcher.handle([order("s-2", "slow-1", fence=2), order("f-1", "fast-0"), order("f-3", "fast-2")])
    )

    async def fast_done() -> bool:
        states = [await state(e, c) for e, c in (("fast-0", "f-1"), ("fast-1", "f-2"), ("fast-2", "f-3"))]
        return all(s.startswith("done:Succeeded") for s in states)

    await until(fast_done)
    assert FAST.sent.count("f-1") == 1  # the redelivered copy was never sent again
    assert SLOW.sent == ["s-1"] and await state("slow-1", "s-1") == "inflight"
    assert await state("slow-1", "s-2") == ""  # not even claimed while s-1 is on its way
    assert not first.done() and not second.done()  # neither batch may be committed yet

    SLOW.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 20)
    assert SLOW.sent == ["s-1", "s-2"]  # in order, one after the other
    assert (await state("slow-1", "s-2")).startswith("done:Succeeded")
    await service.publisher.stop()
    await service.redis.aclose()
    await client.aclose()
