"""The slot rules of BRIEF 3 run through arbitration's real scripts and dispatch's real claim
on a real Redis, with an injected clock and a recording publisher: focused tests of what a
state machine (below) found, then the state machine itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from dercmd import redis_keys, topics
from dercmd.arbitration.app import Arbitration
from dercmd.arbitration.arbiter import Arbiter, Records
from dercmd.consumer import Item
from dercmd.dispatch.delivery import Deliveries
from dercmd.events import (
    CommandAcceptedV1,
    CommandCancelV1,
    CommandStatus,
    CommandType,
    DispatchOrderV1,
    Event,
    StatusEventV1,
    revert_id,
)
from dercmd.fleet import Fleet

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FLEET = Fleet.model_validate(
    {
        "entities": {
            "pv-1": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"},  # the default cooldown
            "pv-2": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud", "cooldownS": 0},
            "dev-1": {"kind": "PV", "vendor": "gridbox", "backend": "native-window", "assets": ["a", "b"], "cooldownS": 300},
        }
    }
)
DEFAULT_COOLDOWN_S = 600


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Recorder:
    """Stands in for the Kafka publisher: keeps what would have been published."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Event]] = []

    async def publish_all(self, records: Records) -> None:
        self.records += [(topic.name, event) for topic, event, _ in records]

    def statuses(self, command_id: str) -> list[tuple[CommandStatus, str | None]]:
        return [(e.status, e.reason) for _, e in self.records if isinstance(e, StatusEventV1) and e.command_id == command_id]

    def orders(self) -> list[DispatchOrderV1]:
        return [e for t, e in self.records if t == topics.ORDERS.name and isinstance(e, DispatchOrderV1)]


class World:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.clock = Clock()
        self.rec = Recorder()
        self.arb = Arbitration(self.rec, Arbiter(client, FLEET, DEFAULT_COOLDOWN_S, now=self.clock), tick_s=0.01)  # type: ignore[arg-type]
        self.deliveries = Deliveries(client)

    async def accept(self, *events: CommandAcceptedV1 | CommandCancelV1) -> None:
        await self.arb.handle([Item(e, None) for e in events])  # type: ignore[arg-type]

    async def claim_latest(self) -> DispatchOrderV1:
        """dispatch claims the latest order (with its fence, as in production)."""
        order = self.rec.orders()[-1]
        assert await self.deliveries.claim(order.entity_id, order.command_id, order.fence) == "claimed"
        return order

    async def at(self, when: datetime) -> None:
        self.clock.now = when
        while await self.arb.tick():
            pass

    async def slot(self, entity: str, field: str) -> str | None:
        raw = await self.client.hget(redis_keys.slots(entity), field)
        return raw.decode() if raw is not None else None


@pytest.fixture
async def world(redis_url: str):  # type: ignore[no-untyped-def]
    client = aioredis.from_url(redis_url)
    yield World(client)
    await client.aclose()


def window(id: str, start: datetime | None, end: datetime | None, *, entity: str = "pv-1", pct: int = 30,
           ignore: bool = False) -> CommandAcceptedV1:
    return CommandAcceptedV1(id=id, entity_id=entity, type=CommandType.LIMIT_PRODUCTION_POWER, percentage=pct,
                             trigger_time=start, end_at=end, ignore_cooldown=ignore, accepted_at=T0, source="test")


def cancel(id: str, *, entity: str = "pv-1", reason: str = "canceled", include_scheduled: bool = True) -> CommandCancelV1:
    return CommandCancelV1(command_id=id, entity_id=entity, reason=reason, by="test", at=T0, include_scheduled=include_scheduled)


# -- focused tests ----------------------------------------------------------------------------


async def test_a_cancel_of_a_delivered_native_window_returns_the_device_to_its_default(world: World) -> None:
    """A native-window backend reverts on its own at endAt, not before: ending its window early
    needs the revert (``DELETE``: "the device is returned to its default")."""
    await world.accept(window("n1", None, T0 + timedelta(hours=1), entity="dev-1"))
    await world.claim_latest()
    await world.accept(cancel("n1", entity="dev-1"))
    revert = world.rec.orders()[-1]
    assert (revert.command_id, revert.revert_of, revert.percentage) == (revert_id("n1"), "n1", 100)
    assert await world.slot("dev-1", "active") == revert_id("n1")
    await world.at(T0 + timedelta(hours=1))
    assert [o.command_id for o in world.rec.orders()] == ["n1", revert_id("n1")]  # its end finds it ended: no other revert


async def test_a_deadline_leaves_a_revert_dispatch_claimed_alone(world: World) -> None:
    """A revert is a command without a decision of its own: a deadline cancel (the sweeper:
    Triggered for too long, the backend still busy with it) took it for a command not decided
    yet and ended it ``Failed: expired`` although dispatch had claimed it."""
    await world.accept(window("w1", None, T0 + timedelta(minutes=1)))
    await world.claim_latest()
    await world.at(T0 + timedelta(minutes=1))
    revert = await world.claim_latest()
    assert revert.revert_of == "w1"
    (d,) = await world.arb._arbiter.decide_many([cancel(revert.command_id, reason="expired", include_scheduled=False)])
    assert d.outcome == "finished"
    await world.accept(cancel(revert.command_id, reason="expired", include_scheduled=False))
    assert world.rec.statuses(revert.command_id) == [(CommandStatus.TRIGGERED, None)]


async def test_a_deadline_leaves_a_superseded_revert_alone(world: World) -> None:
    """... and gave a revert already ``Canceled: superseded`` a second terminal status."""
    await world.accept(window("w1", None, T0 + timedelta(minutes=1)))
    await world.claim_latest()
    await world.at(T0 + timedelta(minutes=1))
    await world.accept(window("w2", None, None, ignore=True))  # supersedes the revert, not claimed yet
    assert world.rec.statuses(revert_id("w1"))[-1] == (CommandStatus.CANCELED, "superseded")
    await world.accept(cancel(revert_id("w1"), reason="expired", include_scheduled=False))
    assert world.rec.statuses(revert_id("w1")) == [(CommandStatus.TRIGGERED, None), (CommandStatus.CANCELED, "superseded")]


async def test_a_deadline_still_ends_a_revert_dispatch_has_not_claimed(world: World) -> None:
    await world.accept(window("w1", None, T0 + timedelta(minutes=1)))
    await world.claim_latest()
    await world.at(T0 + timedelta(minutes=1))
    stale = world.rec.orders()[-1]
    await world.accept(cancel(revert_id("w1"), reason="expired", include_scheduled=False))
    assert world.rec.statuses(revert_id("w1"))[-1] == (CommandStatus.FAILED, "expired")
    assert await world.slot("pv-1", "active") is None
    assert await world.deliveries.claim("pv-1", stale.command_id, stale.fence) == "stale"


async def test_the_decision_of_a_window_far_ahead_outlives_it(world: World) -> None:
    """BRIEF 2.2 allows a startAt up to 2^31 ms (about 24.8 days) ahead and a window as long:
    the decision was kept 7 days (STATE_TTL_S) from when it was taken, so the start (rule 4)
    or the end (rule 5) of a command further ahead found no decision ("gone"): it never
    started, or its window was never reverted (the device held the limit for good)."""
    start, end = T0 + timedelta(days=20), T0 + timedelta(days=44)
    await world.accept(window("far", start, end), window("open", T0 + timedelta(days=10), None, entity="pv-2"))
    far_ttl = await world.client.ttl(redis_keys.decision("pv-1", "far"))
    open_ttl = await world.client.ttl(redis_keys.decision("pv-2", "open"))
    assert far_ttl >= (end - T0).total_seconds() + redis_keys.STATE_TTL_S - 5
    assert open_ttl >= timedelta(days=10).total_seconds() + redis_keys.STATE_TTL_S - 5
    await world.accept(window("now", None, None, entity="pv-2"))  # an immediate command: kept as long as before
    assert await world.client.ttl(redis_keys.decision("pv-2", "now")) <= redis_keys.STATE_TTL_S


@pytest.mark.parametrize(("first", "then", "ends"), [
    ("canceled", "expired", (CommandStatus.CANCELED, "canceled")),
    ("expired", "canceled", (CommandStatus.FAILED, "expired")),
])
async def test_a_second_cancel_repeats_what_the_first_decided(world: World, first: str, then: str,
                                                              ends: tuple[CommandStatus, str]) -> None:
    """A caller's DELETE and a deadline of the sweeper can both be on their way (each checked a
    ledger that was behind). The second found the first's decision and replayed it, but built
    the status from its own reason: the command ended twice, Canceled: canceled and Failed:
    expired (two event ids, so no consumer dropped the second)."""
    await world.accept(window("w1", T0 + timedelta(minutes=5), None))  # scheduled
    await world.accept(cancel("w1", reason=first))
    await world.accept(cancel("w1", reason=then))
    assert world.rec.statuses("w1") == [ends, ends]  # the same event twice (one event id): dropped downstream


async def test_a_deadline_after_a_cancel_of_a_command_not_decided_yet(world: World) -> None:
    await world.accept(cancel("w1"), cancel("w1", reason="expired", include_scheduled=False), window("w1", None, None))
    assert world.rec.statuses("w1") == [(CommandStatus.CANCELED, "canceled")] * 2
    assert world.rec.orders() == []
