"""Slot rules 4-5, cancels and the due-index (BRIEF 3), run by arbitration's real code and
scripts on a real Redis with an injected clock. What would go to Kafka is recorded instead:
these tests are about the rules, the end-to-end tests about the topics."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from dercmd.arbitration.app import Arbitration
from dercmd.arbitration.arbiter import Arbiter
from dercmd.events import (
    CommandAcceptedV1,
    CommandCancelV1,
    CommandStatus,
    CommandType,
    revert_id,
)
from dercmd.fleet import Fleet
from dercmd.state.slots import Slots
from dercmd.state.testing import set_slot_fields

from .arbitration_support import Clock, Recorder

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FLEET = Fleet.model_validate(
    {
        "entities": {
            "pv-1": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"},
            "pv-2": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"},
            "dev-1": {"kind": "PV", "vendor": "gridbox", "backend": "native-window", "assets": ["a", "b"]},
        }
    }
)


@pytest.fixture
async def world(redis_url: str):  # type: ignore[no-untyped-def]
    client = aioredis.from_url(redis_url)
    clock = Clock(T0)
    arbiter = Arbiter(client, FLEET, default_cooldown_s=600, now=clock)
    recorder = Recorder()
    yield Arbitration(recorder, arbiter, tick_s=0.01), arbiter, clock, recorder, client  # type: ignore[arg-type]
    await client.aclose()


def window(id: str, start: datetime | None, end: datetime | None, *, entity: str = "pv-1", pct: int = 30,
           assets: tuple[str, ...] | None = None, ignore: bool = False) -> CommandAcceptedV1:
    return CommandAcceptedV1(id=id, entity_id=entity, type=CommandType.LIMIT_PRODUCTION_POWER, percentage=pct,
                             trigger_time=start, end_at=end, asset_identifiers=assets, ignore_cooldown=ignore,
                             accepted_at=T0, source="test")


def cancel(id: str, *, entity: str = "pv-1", reason: str = "canceled", include_scheduled: bool = True) -> CommandCancelV1:
    return CommandCancelV1(command_id=id, entity_id=entity, reason=reason, by="test", at=T0, include_scheduled=include_scheduled)


async def accept(arb: Arbitration, *events: CommandAcceptedV1 | CommandCancelV1) -> None:
    from dercmd.consumer import Item

    await arb.handle([Item(e, None) for e in events])  # type: ignore[arg-type]


async def test_a_scheduled_window_starts_at_its_start_and_is_reverted_at_its_end(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    start, end = T0 + timedelta(minutes=5), T0 + timedelta(minutes=20)
    await accept(arb, window("w1", start, end, assets=("a",)))
    assert rec.statuses("w1") == [] and rec.orders() == []  # Pending until its start

    clock.now = start - timedelta(milliseconds=1)
    assert await arb.tick() == 0  # not yet
    clock.now = start
    await arb.tick()
    assert rec.statuses("w1") == [(CommandStatus.TRIGGERED, None)]
    (order,) = rec.orders()
    assert (order.command_id, order.percentage, order.start_at, order.end_at, order.asset_identifiers) == ("w1", 30, start, end, ("a",))
    assert (await Slots(client).read("pv-1")).active == "w1"

    await set_slot_fields(client, "pv-1", delivered="w1")  # dispatch claimed it
    clock.now = end
    await arb.tick()
    revert = rec.orders()[-1]
    assert (revert.command_id, revert.revert_of, revert.percentage, revert.asset_identifiers) == (revert_id("w1"), "w1", 100, ("a",))
    assert revert.fence > order.fence
    assert rec.statuses(revert_id("w1")) == [(CommandStatus.TRIGGERED, None)]
    clock.now = end + timedelta(hours=1)
    assert await arb.tick() == 0  # nothing left in the index


async def test_an_immediate_window_activates_now_and_ends_on_time(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    await accept(arb, window("w1", T0, T0 + timedelta(seconds=30)))
    assert rec.orders()[0].command_id == "w1"
    await set_slot_fields(client, "pv-1", delivered="w1")
    clock.now = T0 + timedelta(seconds=30)
    await arb.tick()
    assert rec.orders()[-1].revert_of == "w1"


async def test_a_native_window_is_not_reverted_by_dercmd(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    await accept(arb, window("n1", T0, T0 + timedelta(seconds=30), entity="dev-1"))
    await set_slot_fields(client, "dev-1", delivered="n1")
    clock.now = T0 + timedelta(seconds=31)
    await arb.tick()
    assert [o.command_id for o in rec.orders()] == ["n1"]
    assert (await Slots(client).read("dev-1")).active is None  # the slot empties all the same


async def test_a_window_that_ends_before_it_was_delivered_lapses(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, _ = world
    await accept(arb, window("w1", T0, T0 + timedelta(seconds=30)))
    clock.now = T0 + timedelta(seconds=30)
    await arb.tick()
    assert rec.statuses("w1")[-1] == (CommandStatus.CANCELED, "expired")
    assert len(rec.orders()) == 1  # no revert of what the device never got


async def test_a_scheduled_start_inside_the_cooldown_waits_for_its_end(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, _ = world
    await accept(arb, window("now", None, None, pct=50))  # starts a 10-minute cooldown at T0
    await accept(arb, window("w1", T0 + timedelta(minutes=1), T0 + timedelta(hours=1)))
    clock.now = T0 + timedelta(minutes=1)
    await arb.tick()
    assert rec.statuses("w1") == []  # waiting
    clock.now = T0 + timedelta(minutes=9, seconds=59)
    assert await arb.tick() == 0
    clock.now = T0 + timedelta(minutes=10)
    await arb.tick()
    assert rec.statuses("w1") == [(CommandStatus.TRIGGERED, None)]
    assert rec.statuses("now")[-1] == (CommandStatus.CANCELED, "superseded")  # never claimed by dispatch here


async def test_a_scheduled_window_whose_end_passes_in_the_cooldown_expires(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, _ = world
    await accept(arb, window("now", None, None, pct=50))
    await accept(arb, window("w1", T0 + timedelta(minutes=1), T0 + timedelta(minutes=5)))
    clock.now = T0 + timedelta(minutes=1)
    await arb.tick()
    clock.now = T0 + timedelta(minutes=5)
    await arb.tick()
    assert rec.statuses("w1") == [(CommandStatus.CANCELED, "expired")]


async def test_reverts_are_exempt_from_the_cooldown(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    await accept(arb, window("w1", T0, T0 + timedelta(minutes=1)))  # cooldown until T0 + 10 min
    await set_slot_fields(client, "pv-1", delivered="w1")
    clock.now = T0 + timedelta(minutes=1)
    await arb.tick()
    assert rec.orders()[-1].revert_of == "w1"


async def test_a_newer_command_supersedes_a_revert_not_yet_claimed(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    await accept(arb, window("w1", T0, T0 + timedelta(minutes=1), ignore=True))
    await set_slot_fields(client, "pv-1", delivered="w1")
    clock.now = T0 + timedelta(minutes=1)
    await arb.tick()
    await accept(arb, window("w2", None, None, ignore=True))
    assert rec.statuses(revert_id("w1"))[-1] == (CommandStatus.CANCELED, "superseded")


async def test_cancel_of_a_scheduled_command(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    await accept(arb, window("w1", T0 + timedelta(minutes=5), T0 + timedelta(minutes=20)), cancel("w1"))
    assert rec.statuses("w1") == [(CommandStatus.CANCELED, "canceled")]
    assert (await Slots(client).read("pv-1")).scheduled is None
    clock.now = T0 + timedelta(minutes=5)
    await arb.tick()
    assert rec.orders() == []  # its due entry does nothing


async def test_cancel_of_an_active_command_not_yet_claimed(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, _, rec, client = world
    await accept(arb, window("w1", None, None), cancel("w1"))
    assert rec.statuses("w1")[-1] == (CommandStatus.CANCELED, "canceled")
    slots = await Slots(client).read("pv-1")
    assert slots.active is None and slots.active_fence is not None and slots.active_fence > rec.orders()[0].fence  # its order is stale now


async def test_cancel_of_a_delivered_window_ends_it_with_a_revert(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, client = world
    await accept(arb, window("w1", T0, T0 + timedelta(hours=1)))
    await set_slot_fields(client, "pv-1", delivered="w1")
    await accept(arb, cancel("w1"))
    assert rec.statuses("w1") == [(CommandStatus.TRIGGERED, None)]  # its delivery result stays its status
    assert rec.orders()[-1].revert_of == "w1"
    clock.now = T0 + timedelta(hours=1)
    await arb.tick()
    assert len([o for o in rec.orders() if o.revert_of]) == 1  # the end entry finds it ended


async def test_cancel_of_a_delivered_command_without_window_does_nothing(world) -> None:  # type: ignore[no-untyped-def]
    arb, arbiter, _, rec, client = world
    await accept(arb, window("c1", None, None))
    await set_slot_fields(client, "pv-1", delivered="c1")
    (d,) = await arbiter.decide_many([cancel("c1")])
    assert d.outcome == "finished"


async def test_a_cancel_before_the_command_is_decided_wins(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, _, rec, _ = world
    await accept(arb, cancel("w1"), window("w1", None, None))
    assert rec.statuses("w1") == [(CommandStatus.CANCELED, "canceled")]
    assert rec.orders() == []


async def test_a_stage_deadline_leaves_a_waiting_scheduled_command_alone(world) -> None:  # type: ignore[no-untyped-def]
    arb, arbiter, _, rec, _ = world
    await accept(arb, window("w1", T0 + timedelta(minutes=5), None))
    (d,) = await arbiter.decide_many([cancel("w1", reason="expired", include_scheduled=False)])
    assert d.outcome == "finished"
    await accept(arb, cancel("w1", reason="expired"))
    assert rec.statuses("w1") == [(CommandStatus.FAILED, "expired")]


async def test_redelivered_cancel_repeats_its_events_and_changes_nothing(world) -> None:  # type: ignore[no-untyped-def]
    arb, _, _, rec, client = world
    await accept(arb, window("w1", T0 + timedelta(minutes=5), None), cancel("w1"))
    before = await Slots(client).read("pv-1")
    await accept(arb, cancel("w1"))
    assert rec.statuses("w1") == [(CommandStatus.CANCELED, "canceled")] * 2  # the same event id: dropped downstream
    assert await Slots(client).read("pv-1") == before


async def test_two_replicas_activate_each_start_exactly_once(world, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    arb, _, clock, rec, _ = world
    other_client = aioredis.from_url(redis_url)
    other_rec = Recorder()
    other = Arbitration(other_rec, Arbiter(other_client, FLEET, default_cooldown_s=0, now=clock), tick_s=0.01)  # type: ignore[arg-type]
    start = T0 + timedelta(minutes=1)
    entities = [f"pv-{i}" for i in range(1, 3)]
    await accept(arb, *(window(f"w-{e}", start, None, entity=e) for e in entities))
    clock.now = start
    await asyncio.gather(arb.tick(), other.tick(), arb.tick(), other.tick())
    fired = [o.command_id for o in rec.orders() + other_rec.orders()]
    assert sorted(fired) == sorted(f"w-{e}" for e in entities)
    await other_client.aclose()


async def test_a_taken_entry_that_was_not_settled_is_taken_again_after_its_lease(world) -> None:  # type: ignore[no-untyped-def]
    arb, arbiter, clock, rec, _ = world
    await accept(arb, window("w1", T0 + timedelta(minutes=1), None))
    clock.now = T0 + timedelta(minutes=1)
    taken = await arbiter.due.take(10)  # a replica took it and died before acting
    assert [e.command_id for e in taken] == ["w1"]
    assert await arb.tick() == 0  # leased
    clock.now += timedelta(seconds=11)
    await arb.tick()
    assert [o.command_id for o in rec.orders()] == ["w1"]


async def test_within_the_lead_a_start_is_acted_on_early_as_at_its_start_and_its_order_waits(world) -> None:  # type: ignore[no-untyped-def]
    _, arbiter, clock, rec, _ = world
    arb = Arbitration(rec, arbiter, tick_s=0.01, lead_ms=2000)  # type: ignore[arg-type]
    await accept(arb, window("now", None, None, pct=50))  # cooldown until T0 + 10 min
    start = T0 + timedelta(minutes=10)
    await accept(arb, window("w1", start, start + timedelta(minutes=5)))
    clock.now = start - timedelta(milliseconds=2001)
    assert await arb.tick() == 0  # beyond the lead
    clock.now = start - timedelta(milliseconds=1500)
    await arb.tick()
    # decided as at its start: the cooldown has ended by then
    assert rec.statuses("w1") == [(CommandStatus.TRIGGERED, None)]
    order = rec.orders()[-1]
    assert (order.command_id, order.not_before) == ("w1", start + timedelta(milliseconds=1))


async def test_an_end_within_the_lead_waits_for_the_claim_and_its_revert_waits_for_the_end(world) -> None:  # type: ignore[no-untyped-def]
    _, arbiter, clock, rec, client = world
    arb = Arbitration(rec, arbiter, tick_s=0.01, lead_ms=2000)  # type: ignore[arg-type]
    end = T0 + timedelta(seconds=2)
    await accept(arb, window("w1", T0, end))  # delivered soon, but not claimed yet
    await arb.tick()
    assert rec.statuses("w1") == [(CommandStatus.TRIGGERED, None)]  # not lapsed: its end has not come
    await set_slot_fields(client, "pv-1", delivered="w1")
    clock.now = T0 + timedelta(milliseconds=500)
    await arb.tick()
    revert = rec.orders()[-1]
    assert (revert.revert_of, revert.not_before) == ("w1", end + timedelta(milliseconds=1))


async def test_a_start_waiting_out_a_cooldown_is_decided_once_within_the_lead(world) -> None:  # type: ignore[no-untyped-def]
    _, arbiter, clock, rec, _ = world
    arb = Arbitration(rec, arbiter, tick_s=0.01, lead_ms=2000)  # type: ignore[arg-type]
    await accept(arb, window("now", None, None, pct=50))  # cooldown until T0 + 10 min
    await accept(arb, window("w1", T0 + timedelta(minutes=1), None))
    clock.now = T0 + timedelta(minutes=1)
    await arb.tick()  # waiting, due again at the cooldown's end
    clock.now = T0 + timedelta(minutes=10) - timedelta(milliseconds=1500)
    await arb.tick()  # within the lead of the cooldown's end: decided as then, not waiting again
    assert rec.statuses("w1") == [(CommandStatus.TRIGGERED, None)]
    assert rec.orders()[-1].not_before == T0 + timedelta(minutes=10, milliseconds=1)
