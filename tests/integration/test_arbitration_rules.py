"""Slot rules 1-3 and the cooldown (BRIEF 3), run by the real script on a real Redis, with an
injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from dercmd.arbitration.arbiter import Arbiter, emissions
from dercmd.events import CommandAcceptedV1, CommandStatus, CommandType, DispatchOrderV1, StatusEventV1
from dercmd.fleet import Fleet
from dercmd.state.slots import Slots

from .arbitration_support import Clock

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FLEET = Fleet.model_validate(
    {
        "entities": {
            "pv-1": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"},
            "pv-0": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud", "cooldownS": 0},
        }
    }
)


@pytest.fixture
async def arbiter(redis_url: str):  # type: ignore[no-untyped-def]
    client = aioredis.from_url(redis_url)
    clock = Clock(T0)
    yield Arbiter(client, FLEET, default_cooldown_s=600, now=clock), clock, client
    await client.aclose()


def cmd(id: str, *, entity: str = "pv-1", start: datetime | None = None, end: datetime | None = None, ignore: bool = False) -> CommandAcceptedV1:
    return CommandAcceptedV1(
        id=id, entity_id=entity, type=CommandType.STOP_FEED_IN, trigger_time=start, end_at=end,
        ignore_cooldown=ignore, accepted_at=T0, source="test",
    )


async def test_immediate_command_activates_and_starts_the_cooldown(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, clock, _ = arbiter
    d = await a.decide(cmd("c1"))
    assert (d.outcome, d.fence, d.superseded, d.duplicate) == ("activated", 1, (), False)
    assert d.cooldown_until == T0 + timedelta(minutes=10)

    clock.now = T0 + timedelta(minutes=9, seconds=59)
    refused = await a.decide(cmd("c2"))
    assert refused.outcome == "cooldown" and refused.cooldown_until == T0 + timedelta(minutes=10)
    assert refused.fence == 1  # a refusal changes no slot

    clock.now = T0 + timedelta(minutes=10)
    later = await a.decide(cmd("c3"))
    assert (later.outcome, later.fence, later.superseded) == ("activated", 2, ("c1",))


async def test_ignore_cooldown_goes_through_and_supersedes_the_active_command(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, clock, _ = arbiter
    await a.decide(cmd("c1"))
    clock.now = T0 + timedelta(seconds=5)
    d = await a.decide(cmd("c2", ignore=True))
    assert (d.outcome, d.fence, d.superseded) == ("activated", 2, ("c1",))
    first, then = emissions(cmd("c2", ignore=True), d, clock.now)
    canceled = [e for _, e, _ in first if isinstance(e, StatusEventV1) and e.status is CommandStatus.CANCELED]
    assert [(e.command_id, e.reason, e.superseded_by) for e in canceled] == [("c1", "superseded", "c2")]
    (order,) = [e for _, e, _ in then]
    assert isinstance(order, DispatchOrderV1) and order.fence == 2


async def test_future_command_is_scheduled_and_overwrites_the_scheduled_one(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, _, client = arbiter
    s1 = await a.decide(cmd("s1", start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=2)))
    s2 = await a.decide(cmd("s2", start=T0 + timedelta(hours=3)))
    assert (s1.outcome, s1.fence, s1.superseded) == ("scheduled", 1, ())
    assert (s2.outcome, s2.fence, s2.superseded) == ("scheduled", 2, ("s1",))
    slots = await Slots(client).read("pv-1")
    assert slots.scheduled == "s2" and slots.active is None


async def test_immediate_command_deletes_the_scheduled_one(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, _, client = arbiter
    await a.decide(cmd("s1", start=T0 + timedelta(hours=1)))
    d = await a.decide(cmd("now"))
    assert (d.outcome, d.superseded) == ("activated", ("s1",))
    slots = await Slots(client).read("pv-1")
    assert slots.active == "now" and slots.scheduled is None


async def test_a_window_already_over_is_ignored(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, _, client = arbiter
    d = await a.decide(cmd("old", start=T0 - timedelta(hours=2), end=T0 - timedelta(seconds=1)))
    assert d.outcome == "expired"
    assert (await Slots(client).read("pv-1")).active is None


async def test_a_redelivered_command_changes_nothing(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, clock, client = arbiter
    first = await a.decide(cmd("c1"))
    before = await Slots(client).read("pv-1")
    clock.now = T0 + timedelta(hours=1)  # even outside the cooldown
    again = await a.decide(cmd("c1"))
    assert again.duplicate and (again.outcome, again.fence) == (first.outcome, first.fence)
    assert await Slots(client).read("pv-1") == before


async def test_a_zero_cooldown_disables_it(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = arbiter
    assert (await a.decide(cmd("a", entity="pv-0"))).outcome == "activated"
    assert (await a.decide(cmd("b", entity="pv-0"))).outcome == "activated"


async def test_without_an_injected_clock_redis_time_is_used(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = await Arbiter(client, FLEET, default_cooldown_s=600).decide(cmd("c1"))
    assert d.outcome == "activated"
    assert d.cooldown_until is not None
    assert abs((d.cooldown_until - datetime.now(UTC)) - timedelta(minutes=10)) < timedelta(seconds=5)
    await client.aclose()


async def test_a_command_announced_again_by_recovery_repeats_its_order_marked_recovered(arbiter) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = arbiter
    first = await a.decide(cmd("c1"))
    again = cmd("c1").model_copy(update={"recovered": True})
    repeated = await a.decide(again)
    assert (repeated.outcome, repeated.fence) == ("activated", first.fence)  # the same decision, the same fence
    (order,) = [e for _, e, _ in emissions(again, repeated, T0)[1]]
    assert isinstance(order, DispatchOrderV1) and order.recovered and order.fence == first.fence
    (plain,) = [e for _, e, _ in emissions(cmd("c1"), first, T0)[1]]
    assert isinstance(plain, DispatchOrderV1) and not plain.recovered
