"""Redis bytes per entity with both slots filled (BRIEF 8: under 1 KB).

In an empty Redis database, for each of M entities: arbitration's decision
(what arbitration's ``Arbiter.decide`` does: :class:`dercmd.state.slots.Slots`, and the
due-index entry of a scheduled command) for one immediate command (fills the active slot) and one scheduled an hour ahead (fills the
scheduled slot), and dispatch's ``Deliveries.claim`` of the active one: the keys a busy
entity holds (slots hash, two decisions, one delivery state). The figure is
(``INFO memory`` used_memory after - before) / M. used_memory is the whole server's, so it
is exact only while nothing else writes to that server: the bench measures it before it
starts the stack.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from dercmd.state.delivery import Deliveries
from dercmd.events import CommandAcceptedV1, CommandType
from dercmd.fleet import Fleet
from dercmd.state.due import Due, Entry
from dercmd.state.slots import Decide, Outcome, Slots

_CONCURRENCY = 50


@dataclass
class RedisMemory:
    entities: int
    bytes_per_entity: float
    keys_per_entity: float
    outcomes: dict[str, int]  # decisions and claims, e.g. {"activated": M, "scheduled": M, "claimed": M}


def _command(command_id: str, entity_id: str, trigger_time: datetime | None) -> CommandAcceptedV1:
    return CommandAcceptedV1(id=command_id, entity_id=entity_id, type=CommandType.START_CHARGING,
                             trigger_time=trigger_time, accepted_at=datetime.now(UTC), source="bench")


async def measure(redis_url: str, fleet: Fleet, entity_ids: list[str]) -> RedisMemory:
    client = aioredis.from_url(redis_url)
    try:
        slots, due = Slots(client), Due(client)

        def cooldown_ms(entity_id: str) -> int:  # as arbitration's, with no default cooldown
            entity = fleet.entity(entity_id)
            return int(fleet.cooldown_s(entity, 0) * 1000) if entity else 0

        deliveries = Deliveries(client)
        outcomes: Counter[str] = Counter()

        async def fill(entity_id: str, n: int) -> None:
            (active,) = await slots.run([Decide.of(_command(f"bench-mem-{n}-a", entity_id, None), cooldown_ms(entity_id))])
            later = _command(f"bench-mem-{n}-s", entity_id, datetime.now(UTC) + timedelta(hours=1))
            (scheduled,) = await slots.run([Decide.of(later, cooldown_ms(entity_id))])
            if scheduled.outcome is Outcome.SCHEDULED and later.trigger_time is not None:
                await due.add_many([Entry("s", entity_id, later.id, int(later.trigger_time.timestamp() * 1000))])
            claim = await deliveries.claim(entity_id, f"bench-mem-{n}-a", active.fence)
            outcomes.update((active.outcome.value, scheduled.outcome.value, claim.step.value))

        # Load both scripts and open every connection first, so neither counts per entity.
        await fill(entity_ids[0], -1)
        await asyncio.gather(*(client.ping() for _ in range(_CONCURRENCY)))
        await client.flushdb()
        outcomes.clear()
        before = int((await client.info("memory"))["used_memory"])
        for start in range(0, len(entity_ids), _CONCURRENCY):
            chunk = entity_ids[start : start + _CONCURRENCY]
            await asyncio.gather(*(fill(e, start + i) for i, e in enumerate(chunk)))
        after = int((await client.info("memory"))["used_memory"])
        keys = int(await client.dbsize())
        await client.flushdb()
        m = len(entity_ids)
        return RedisMemory(m, (after - before) / m, keys / m, dict(outcomes))
    finally:
        await client.aclose()
