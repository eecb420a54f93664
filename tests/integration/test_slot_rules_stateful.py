"""The slot rules of BRIEF 3, run through arbitration's real scripts (``Arbitration.handle`` for
new commands and cancels, ``Arbitration.tick`` for the due-index) and dispatch's real claim
(``Deliveries.claim``, with the order's fence) on a real Redis, with an injected clock and a
recording publisher: first focused tests of what writing the state machine found, then the
state machine itself.

The state machine drives random commands, cancels, deadlines, dispatch claims and clock
advances for three entities (a backend without native windows with the default cooldown, one
without a cooldown, a native-window backend), with the due-index acting at each due time (no
lead: ``DERCMD_DUE_LEAD_MS`` is not modelled), and checks every step against a small reference
model written here in plain Python, which holds per entity the active command, the scheduled
command, which command dispatch has claimed and the end of the cooldown, and says what each
step must publish:

1. endAt in the past (or now): ``Canceled: expired``, no slot changes;
2. startAt past or now: refused (``Failed: cooldown_active``) inside the cooldown unless it
   ignores it; else it becomes active (the active command is superseded unless dispatch claimed
   it, the scheduled one is superseded) and starts the cooldown;
3. startAt in the future: scheduled, superseding the scheduled one;
4. at its startAt the scheduled command becomes active as in 2, or, inside the cooldown, waits
   for the cooldown's end (``Canceled: expired`` if its endAt comes first);
5. at the active window's endAt: ``Canceled: expired`` if dispatch had not claimed it (it
   lapsed); else the revert (100 %, ``revertOf``) becomes the active command for a backend
   without native windows, and the slot empties for one with them. Reverts are exempt from the
   cooldown and do not start one.

A caller's cancel (DELETE) ends a scheduled command or an active one dispatch has not claimed
(``Canceled: canceled``), ends a claimed active window now with its revert (on every backend:
a native one would hold the window until its endAt), and does nothing to anything else; a
command not decided yet is canceled first and its decision then does nothing. A deadline (the
status service's sweeper: reason ``expired``) does the same with ``Failed: expired``, leaves a
claimed window alone, leaves a scheduled command alone unless it is the caller's expiresAt,
and may name a revert too.

What the scripts publish again on purpose (a redelivered event, a replayed decision) carries the
same event id (``<command>/<status>``, an order's ``<command>/<fence>``) and the same content,
and is dropped by consumers; the comparison with the model counts each id once.
"""


from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from dercmd import topics
from dercmd.arbitration.app import Arbitration
from dercmd.arbitration.arbiter import Arbiter
from dercmd.consumer import Item
from dercmd.state.delivery import Deliveries, Stage, Step, Transition
from dercmd.events import (
    REVERT_SUFFIX,
    CommandAcceptedV1,
    CommandCancelV1,
    CommandStatus,
    CommandType,
    DispatchOrderV1,
    StatusEventV1,
    revert_id,
)
from dercmd.fleet import Fleet
from dercmd.state.keys import STATE_TTL_S
from dercmd.state.slots import Slots

from .arbitration_support import Clock, Recorder

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


class World:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.clock = Clock(T0)
        self.rec = Recorder()
        self.arb = Arbitration(self.rec, Arbiter(client, FLEET, DEFAULT_COOLDOWN_S, now=self.clock), tick_s=0.01)  # type: ignore[arg-type]
        self.deliveries = Deliveries(client)

    async def accept(self, *events: CommandAcceptedV1 | CommandCancelV1) -> None:
        await self.arb.handle([Item(e, None) for e in events])  # type: ignore[arg-type]

    async def claim_latest(self) -> DispatchOrderV1:
        """dispatch claims the latest order (with its fence, as in production)."""
        order = self.rec.orders()[-1]
        assert (await self.deliveries.claim(order.entity_id, order.command_id, order.fence, window=order.end_at is not None)).step is Step.CLAIMED
        return order

    async def at(self, when: datetime) -> None:
        self.clock.now = when
        while await self.arb.tick():
            pass

    async def slot(self, entity: str, field: str) -> str | None:
        value = getattr(await Slots(self.client).read(entity), field)
        return str(value) if value is not None else None


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
    assert (await world.deliveries.claim("pv-1", stale.command_id, stale.fence)).step is Step.STALE


async def test_the_decision_of_a_window_far_ahead_outlives_it(world: World) -> None:
    """BRIEF 2.2 allows a startAt up to 2^31 ms (about 24.8 days) ahead and a window as long:
    the decision was kept 7 days (STATE_TTL_S) from when it was taken, so the start (rule 4)
    or the end (rule 5) of a command further ahead found no decision ("gone"): it never
    started, or its window was never reverted (the device held the limit for good)."""
    start, end = T0 + timedelta(days=20), T0 + timedelta(days=44)
    await world.accept(window("far", start, end), window("open", T0 + timedelta(days=10), None, entity="pv-2"))
    slots = Slots(world.client)
    far_ttl = await slots.decision_ttl("pv-1", "far")
    open_ttl = await slots.decision_ttl("pv-2", "open")
    assert far_ttl >= (end - T0).total_seconds() + STATE_TTL_S - 5
    assert open_ttl >= timedelta(days=10).total_seconds() + STATE_TTL_S - 5
    await world.accept(window("now", None, None, entity="pv-2"))  # an immediate command: kept as long as before
    assert await slots.decision_ttl("pv-2", "now") <= STATE_TTL_S


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


@pytest.mark.parametrize("then", ["lapses", "is canceled"])
async def test_a_delivered_window_replaced_by_a_command_never_delivered_is_still_reverted(world: World, then: str) -> None:
    """Rule 5: when the slot empties "the device returns to its default". A delivered window x
    replaced by y (not superseded: dispatch claimed x) has its end find y active, so x gets no
    revert of its own; if y then leaves the slot undelivered (its window lapses, or the caller
    cancels it), the device would keep x's limit (here 0 %) for good: the slot remembers what
    the device holds ("held"), and x is reverted then."""
    await world.accept(window("x", None, T0 + timedelta(minutes=30), pct=0))
    await world.claim_latest()  # the device limits production to 0 %
    await world.accept(window("y", None, T0 + timedelta(minutes=5), pct=50, ignore=True))  # dispatch is slow to claim it
    if then == "is canceled":
        await world.accept(cancel("y"))
    await world.at(T0 + timedelta(hours=1))  # y's end (it lapses) and x's end (it is no longer active)
    # When y left undelivered, the device still held x: x is reverted, by a revert named after y.
    assert await world.slot("pv-1", "active") == revert_id("y")
    assert [(o.command_id, o.revert_of, o.percentage) for o in world.rec.orders() if o.revert_of] == [(revert_id("y"), "x", 100)]


T = TypeVar("T")

T0_MS = int(T0.timestamp()) * 1000
S = 1000  # every time in this test is a whole second: exact through datetime and back
MIN = 60 * S

COOLDOWN_MS = {"pv-1": DEFAULT_COOLDOWN_S * S, "pv-2": 0, "dev-1": 300 * S}
NATIVE = {"dev-1"}
ENTITIES = tuple(COOLDOWN_MS)


def at(ms: int) -> datetime:
    assert ms % S == 0
    return T0 + timedelta(milliseconds=ms - T0_MS)


# -- the state machine: the reference model -------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A new command as the model sees it (times in ms; start None: immediate)."""

    id: str
    entity: str
    start: int | None
    end: int | None
    ignore: bool
    percentage: int
    assets: tuple[str, ...] | None


@dataclass
class Active:
    id: str
    end: int | None  # None: holds until replaced (and a revert)
    revert_of: str | None
    assets: tuple[str, ...] | None
    percentage: int


@dataclass
class Scheduled:
    spec: Spec
    due: int  # its startAt, or the end of the cooldown it waits for (or its endAt, if sooner)


@dataclass
class Slot:
    active: Active | None = None
    scheduled: Scheduled | None = None
    delivered: str | None = None  # the active command, once dispatch claimed it
    held: str | None = None  # the window the device holds: the last command claimed, if a window
    cooldown_until: int = 0


# What the model expects to be published: statuses (any order within a step) and, per entity,
# dispatch orders in order.
StatusKey = tuple[str, CommandStatus, str | None, str | None, str | None, int | None]
OrderKey = tuple[str, str | None, int | None, tuple[str, ...] | None]


@dataclass
class Model:
    slots: dict[str, Slot] = field(default_factory=lambda: {e: Slot() for e in ENTITIES})
    known: set[str] = field(default_factory=set)  # ids arbitration has a decision for
    claimed: set[str] = field(default_factory=set)
    reverts: dict[str, str] = field(default_factory=dict)  # revert id -> entity
    statuses: list[StatusKey] = field(default_factory=list)  # expected in the current step
    orders: dict[str, list[OrderKey]] = field(default_factory=dict)

    def status(self, cmd: str, status: CommandStatus, reason: str | None = None, *, by: str | None = None,
               revert_of: str | None = None, cooldown_until: int | None = None) -> None:
        self.statuses.append((cmd, status, reason, by, revert_of, cooldown_until))

    def order(self, entity: str, cmd: str, revert_of: str | None, percentage: int, assets: tuple[str, ...] | None) -> None:
        assert self.slots[entity].active is not None and self.slots[entity].active.id == cmd  # noqa: PT018
        self.orders.setdefault(entity, []).append((cmd, revert_of, percentage, assets))

    def take_expected(self) -> tuple[list[StatusKey], dict[str, list[OrderKey]]]:
        statuses, orders = self.statuses, self.orders
        self.statuses, self.orders = [], {}
        return statuses, orders

    # rules 1-3
    def decide(self, spec: Spec, now: int) -> None:
        if spec.id in self.known:
            return  # a redelivery, or canceled before it was decided: nothing new
        self.known.add(spec.id)
        slot = self.slots[spec.entity]
        if spec.end is not None and spec.end <= now:
            self.status(spec.id, CommandStatus.CANCELED, "expired")
        elif spec.start is None or spec.start <= now:
            if not spec.ignore and slot.cooldown_until > now:
                self.status(spec.id, CommandStatus.FAILED, "cooldown_active", cooldown_until=slot.cooldown_until)
            else:
                self._activate(spec, now)
        else:
            if slot.scheduled is not None:
                self.status(slot.scheduled.spec.id, CommandStatus.CANCELED, "superseded", by=spec.id)
            slot.scheduled = Scheduled(spec, spec.start)

    def _activate(self, spec: Spec, now: int) -> None:
        slot = self.slots[spec.entity]
        if slot.active is not None and slot.active.id != slot.delivered:
            self.status(slot.active.id, CommandStatus.CANCELED, "superseded", by=spec.id)
        if slot.scheduled is not None and slot.scheduled.spec.id != spec.id:
            self.status(slot.scheduled.spec.id, CommandStatus.CANCELED, "superseded", by=spec.id)
        slot.active = Active(spec.id, spec.end, None, spec.assets, spec.percentage)
        slot.scheduled = None
        slot.delivered = None
        if COOLDOWN_MS[spec.entity]:
            slot.cooldown_until = now + COOLDOWN_MS[spec.entity]
        self.status(spec.id, CommandStatus.TRIGGERED)
        self.order(spec.entity, spec.id, None, spec.percentage, spec.assets)

    # rule 4
    def _start(self, entity: str, now: int) -> None:
        slot = self.slots[entity]
        assert slot.scheduled is not None
        spec = slot.scheduled.spec
        if spec.end is not None and spec.end <= now:
            slot.scheduled = None
            self.status(spec.id, CommandStatus.CANCELED, "expired")
        elif not spec.ignore and slot.cooldown_until > now:
            slot.scheduled.due = min(slot.cooldown_until, spec.end) if spec.end is not None else slot.cooldown_until
        else:
            self._activate(spec, now)

    # rule 5 (and the early end of a claimed window by a caller's cancel)
    def _end(self, entity: str, *, early: bool = False) -> None:
        slot = self.slots[entity]
        active = slot.active
        assert active is not None
        if slot.delivered != active.id:
            slot.active = None
            self.status(active.id, CommandStatus.CANCELED, "expired")  # it lapsed
            self._vacate(entity, active.id)
        elif entity in NATIVE and not early:
            slot.active = None  # the backend reverts by itself at the window's end
            slot.held = None
        else:
            revert = revert_id(active.id)
            self.known.add(revert)
            self.reverts[revert] = entity
            slot.active = Active(revert, None, active.id, active.assets, 100)
            self.status(revert, CommandStatus.TRIGGERED, revert_of=active.id)
            self.order(entity, revert, active.id, 100, active.assets)
        slot.delivered = None

    def _vacate(self, entity: str, cmd: str, revert_of: str | None = None) -> None:
        """``cmd`` left the slot undelivered: a window the device still holds is reverted
        (unless ``cmd`` was that window's revert: no revert of a revert)."""
        slot = self.slots[entity]
        if slot.held is not None and slot.held != cmd and slot.held != revert_of:
            revert = revert_id(cmd)
            self.known.add(revert)
            self.reverts[revert] = entity
            slot.active = Active(revert, None, slot.held, None, 100)
            self.status(revert, CommandStatus.TRIGGERED, revert_of=slot.held)
            self.order(entity, revert, slot.held, 100, None)

    def due_times(self) -> list[int]:
        """Every time at which something happens by itself (and the cooldowns' ends)."""
        times = []
        for slot in self.slots.values():
            if slot.scheduled is not None:
                times.append(slot.scheduled.due)
                if slot.scheduled.spec.end is not None:
                    times.append(slot.scheduled.spec.end)
            if slot.active is not None and slot.active.end is not None:
                times.append(slot.active.end)
            times.append(slot.cooldown_until)
        return times

    def run_due(self, now: int) -> None:
        """What the due-index does at ``now``: per entity, what has come due, earliest first
        (an end before a start at the same time)."""
        for entity, slot in self.slots.items():
            while True:
                due: list[tuple[int, int]] = []
                if slot.active is not None and slot.active.end is not None and slot.active.end <= now:
                    due.append((slot.active.end, 0))
                if slot.scheduled is not None and slot.scheduled.due <= now:
                    due.append((slot.scheduled.due, 1))
                if not due:
                    break
                if min(due)[1] == 0:
                    self._end(entity)
                else:
                    before = slot.scheduled
                    self._start(entity, now)
                    assert slot.scheduled is not before or before.due > now  # noqa: PT018 (waits: due later)

    def cancel(self, cmd: str, entity: str, reason: str = "canceled", include_scheduled: bool = True) -> None:
        """A caller's cancel (reason ``canceled``), or a deadline (``expired``: the caller's
        expiresAt with ``include_scheduled``, a stage deadline without)."""
        slot = self.slots[entity]
        end = (CommandStatus.CANCELED, "canceled") if reason == "canceled" else (CommandStatus.FAILED, reason)
        if cmd not in self.known:
            self.known.add(cmd)  # ended before it was decided: arbitration will never act on it
            self.status(cmd, *end)
        elif include_scheduled and slot.scheduled is not None and slot.scheduled.spec.id == cmd:
            slot.scheduled = None
            self.status(cmd, *end)
        elif slot.active is not None and slot.active.id == cmd and slot.delivered != cmd:
            revert_of = slot.active.revert_of
            slot.active = None
            slot.delivered = None
            self.status(cmd, *end)
            self._vacate(entity, cmd, revert_of)
        elif slot.active is not None and slot.active.id == cmd and slot.active.end is not None and reason == "canceled":
            self._end(entity, early=True)  # a delivered window the caller ends now
        # else: delivered (its delivery result is its status), superseded, finished, or a
        # scheduled command a stage deadline leaves to the due-index: nothing

    def claim(self, entity: str, cmd: str) -> Transition:
        """What dispatch's claim of the order of ``cmd`` answers."""
        if cmd in self.claimed:
            return Transition(Step.FOUND, Stage.INFLIGHT)
        slot = self.slots[entity]
        if slot.active is not None and slot.active.id == cmd:
            self.claimed.add(cmd)
            slot.delivered = cmd
            slot.held = cmd if slot.active.end is not None else None
            return Transition(Step.CLAIMED, Stage.INFLIGHT)
        return Transition(Step.STALE, Stage.MISSING)


# -- the machine ------------------------------------------------------------------------------


class MsClock:
    """The injected clock, in whole seconds."""

    def __init__(self) -> None:
        self.ms = T0_MS

    def __call__(self) -> datetime:
        return at(self.ms)


PERCENTAGES = (0, 30, 70)


class SlotRules(RuleBasedStateMachine):
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.from_url(self.redis_url)
        self.run(self.client.flushdb())
        self.clock = MsClock()
        self.recorder = Recorder()
        self.arbitration = Arbitration(self.recorder, Arbiter(self.client, FLEET, DEFAULT_COOLDOWN_S, now=self.clock),  # type: ignore[arg-type]
                                       tick_s=0.01)
        self.deliveries = Deliveries(self.client)
        self.model = Model()
        self.next_id = 0
        self.sent: list[CommandAcceptedV1] = []  # what was accepted, for redeliveries
        self.entity_of: dict[str, str] = {}  # every command id used, decided or not
        self.undecided: list[str] = []  # canceled before being decided: may come now
        # what was published, each event id once
        self.seen = 0
        self.status_events: dict[str, StatusEventV1] = {}
        self.terminal: dict[str, StatusEventV1] = {}
        self.order_events: dict[tuple[str, int], DispatchOrderV1] = {}
        self.orders: list[DispatchOrderV1] = []
        self.last_fence: dict[str, int] = {}
        self.triggered_fence: dict[str, int] = {}

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()

    @property
    def now(self) -> int:
        return self.clock.ms

    def fresh_id(self, entity: str) -> str:
        self.next_id += 1
        cmd = f"c{self.next_id}"
        self.entity_of[cmd] = entity
        return cmd

    # -- drawing commands -------------------------------------------------------------

    def draw_command(self, data: st.DataObject, entity: str | None = None, start_kind: str | None = None,
                     end_kinds: list[str] | None = None) -> CommandAcceptedV1:
        now = self.now
        if entity is not None:
            cmd = self.fresh_id(entity)
        elif self.undecided and data.draw(st.integers(0, 7), label="an id canceled before") == 0:
            cmd = data.draw(st.sampled_from(self.undecided), label="id")
            entity = self.entity_of[cmd]
        else:
            entity = data.draw(st.sampled_from(ENTITIES), label="entity")
            cmd = self.fresh_id(entity)
        anchors = sorted({t for t in self.model.due_times() if t > now})  # to land on others' boundaries
        if start_kind is None:
            start_kind = data.draw(st.sampled_from(["immediate", "immediate", "past", "now", "future", "anchor", "in the cooldown"]),
                                   label="start")
        start: int | None
        if start_kind == "immediate":
            start = None
        elif start_kind == "past":
            start = now - data.draw(st.integers(1, 3)) * MIN
        elif start_kind == "now":
            start = now
        elif start_kind == "anchor" and anchors:
            start = data.draw(st.sampled_from(anchors), label="start at")
        elif start_kind == "in the cooldown" and self.model.slots[entity].cooldown_until > now + S:
            start = data.draw(st.integers(now + S, self.model.slots[entity].cooldown_until - S), label="start at")
            start -= start % S
        else:
            start = now + data.draw(st.integers(1, 15)) * MIN
        base = now if start is None else start
        cooldown_until = self.model.slots[entity].cooldown_until
        if end_kinds is None:
            end_kinds = ["none", "none", "window", "window", "window", "anchor", "anchor", "over"]
        if cooldown_until > base + S:
            end_kinds = [*end_kinds, "in the cooldown", "at the cooldown's end"]
        else:
            end_kinds = [k for k in end_kinds if k != "in the cooldown"] or ["window"]
        end_kind = data.draw(st.sampled_from(end_kinds), label="end")
        end: int | None
        if end_kind == "in the cooldown":
            end = data.draw(st.integers(base + S, cooldown_until - S), label="end at")
            end -= end % S
        elif end_kind == "at the cooldown's end":
            end = cooldown_until
        elif end_kind == "none":
            end = None
        elif end_kind == "over":  # rule 1 (endAt after startAt, but not after now)
            end = now - data.draw(st.integers(0, 2)) * MIN
            if start is not None and end <= start:
                start = end - MIN
        elif end_kind == "anchor" and [t for t in anchors if t > base]:
            end = data.draw(st.sampled_from([t for t in anchors if t > base]), label="end at")
        else:
            end = base + data.draw(st.integers(1, 15)) * MIN
        assets = data.draw(st.sampled_from([None, ("a",)]), label="assets") if entity in NATIVE else None
        ev = CommandAcceptedV1(
            id=cmd, entity_id=entity, type=CommandType.LIMIT_PRODUCTION_POWER,
            percentage=data.draw(st.sampled_from(PERCENTAGES), label="percentage"),
            trigger_time=at(start) if start is not None else None, end_at=at(end) if end is not None else None,
            asset_identifiers=assets, ignore_cooldown=data.draw(st.integers(0, 5), label="ignoreCooldown") == 0,
            accepted_at=at(now), source="test",
        )
        if cmd in self.undecided:
            self.undecided.remove(cmd)
        return ev

    def draw_cancel(self, data: st.DataObject, deadline: bool = False) -> CommandCancelV1:
        """A caller's DELETE, or a deadline of the status service's sweeper (which may name a
        revert too: intake refuses a DELETE of one)."""
        known = sorted(self.entity_of, key=lambda c: int(c[1:]))
        if not known or data.draw(st.integers(0, 9), label="a command not decided yet") == 0:
            entity = data.draw(st.sampled_from(ENTITIES), label="entity")
            cmd = self.fresh_id(entity)
            self.undecided.append(cmd)
        else:
            # Mostly what holds a slot now; any other command too (intake's check of the ledger,
            # or the sweeper's, may be behind: arbitration decides).
            slots = self.model.slots.values()
            holding = [s.active.id for s in slots if s.active and (deadline or s.active.revert_of is None)]
            holding += [s.scheduled.spec.id for s in slots if s.scheduled]
            pool = holding if holding and data.draw(st.integers(0, 3), label="one holding a slot") > 0 else (
                known + sorted(self.model.reverts) if deadline else known)
            cmd = data.draw(st.sampled_from(pool), label="cancel")
            entity = self.entity_of.get(cmd) or self.model.reverts[cmd]
        if deadline:
            caller = data.draw(st.booleans(), label="the caller's expiresAt (else a stage deadline)")
            return CommandCancelV1(command_id=cmd, entity_id=entity, reason="expired", detail="deadline", include_scheduled=caller,
                                   at=at(self.now))
        return CommandCancelV1(command_id=cmd, entity_id=entity, reason="canceled", by="test", at=at(self.now))

    def apply(self, ev: CommandAcceptedV1 | CommandCancelV1) -> None:
        """The model's side of handling one event."""
        if isinstance(ev, CommandCancelV1):
            self.model.cancel(ev.command_id, ev.entity_id, ev.reason, ev.include_scheduled)
            return
        ms = lambda t: int(t.timestamp()) * 1000 if t is not None else None  # noqa: E731 (whole seconds)
        self.model.decide(Spec(ev.id, ev.entity_id, ms(ev.trigger_time), ms(ev.end_at), ev.ignore_cooldown,
                               ev.percentage or 0, ev.asset_identifiers), self.now)

    def handle(self, events: list[CommandAcceptedV1 | CommandCancelV1]) -> None:
        self.run(self.arbitration.handle([Item(e, None) for e in events]))  # type: ignore[arg-type]
        for ev in events:
            if isinstance(ev, CommandAcceptedV1) and ev not in self.sent:
                self.sent.append(ev)
            self.apply(ev)
        self.settle()

    # -- rules ------------------------------------------------------------------------

    @rule(data=st.data(), n=st.sampled_from([1, 1, 1, 2, 3]))
    def accept(self, data: st.DataObject, n: int) -> None:
        """New commands and cancels (a caller's DELETE), one or several in one consumed batch
        (decided in one pipeline, in their order); now and then an accepted event consumed
        again (a crash before the commit), which changes nothing."""
        events: list[CommandAcceptedV1 | CommandCancelV1] = []
        for _ in range(n):
            what = data.draw(st.integers(0, 9), label="what")
            if what < 2:
                events.append(self.draw_cancel(data))
            elif what == 2:
                events.append(self.draw_cancel(data, deadline=True))
            elif what == 3 and self.sent:
                events.append(data.draw(st.sampled_from(self.sent), label="redelivered"))
            else:
                events.append(self.draw_command(data))
        self.handle(events)

    @rule(data=st.data(), entity=st.sampled_from(ENTITIES))
    def command_now(self, data: st.DataObject, entity: str) -> None:
        """An immediate command (after a clock advance: often right on a boundary)."""
        self.handle([self.draw_command(data, entity, "immediate")])

    @precondition(lambda self: any(s.active for s in self.model.slots.values()))
    @rule(data=st.data())
    def cancel_the_active(self, data: st.DataObject) -> None:
        """A caller's DELETE of an active command (claimed or not, a window or not), or a
        deadline for it (then it may be a revert)."""
        deadline = data.draw(st.booleans(), label="a deadline")
        active = [s.active for s in self.model.slots.values() if s.active and (deadline or s.active.revert_of is None)]
        if deadline and any(a.revert_of for a in active) and data.draw(st.booleans(), label="a revert"):
            active = [a for a in active if a.revert_of]
        if active:
            cmd = data.draw(st.sampled_from(active), label="active").id
            entity = self.entity_of.get(cmd) or self.model.reverts[cmd]
            self.handle([CommandCancelV1(command_id=cmd, entity_id=entity, reason="expired" if deadline else "canceled",
                                         by=None if deadline else "test", at=at(self.now))])

    @precondition(lambda self: any(s.cooldown_until > self.now + S for s in self.model.slots.values()))
    @rule(data=st.data())
    def schedule_in_the_cooldown(self, data: st.DataObject) -> None:
        """A command due inside an entity's cooldown (it will wait for its end, or expire)."""
        entity = data.draw(st.sampled_from([e for e, s in self.model.slots.items() if s.cooldown_until > self.now + S]), label="entity")
        self.handle([self.draw_command(data, entity, "in the cooldown", ["none", "window", "in the cooldown"])])

    @precondition(lambda self: self.orders)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """dispatch claims an order (its real script, with the order's fence): the active
        command's latest order, mostly; any earlier order is stale (or claimed already)."""
        latest = sorted({o.entity_id: o for o in self.orders}.values(), key=lambda o: o.entity_id)
        unclaimed = [o for o in latest if o.command_id not in self.model.claimed]
        which = data.draw(st.integers(0, 3), label="which order")
        pool = unclaimed if which < 2 and unclaimed else latest if which < 3 else self.orders
        order = data.draw(st.sampled_from(pool), label="order")
        got = self.run(self.deliveries.claim(order.entity_id, order.command_id, order.fence, window=order.end_at is not None))
        expected = self.model.claim(order.entity_id, order.command_id)
        assert got == expected, f"claim of {order.command_id} (fence {order.fence}): {got}, the model says {expected}"
        if got.step is Step.CLAIMED:
            assert order.command_id not in self.terminal, f"claimed {order.command_id} after {self.terminal[order.command_id]}"
        self.settle()

    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        now = self.now
        upcoming = sorted({t for t in self.model.due_times() if t > now})
        how = data.draw(st.sampled_from(["minutes", "onto the next", "onto the next", "just before the next", "between the next two",
                                         "past several"]), label="advance")
        if how == "minutes" or not upcoming:
            self.clock.ms = now + data.draw(st.integers(1, 12), label="minutes") * MIN
        elif how == "onto the next":
            self.clock.ms = upcoming[0]
        elif how == "just before the next":
            self.clock.ms = max(now + S, upcoming[0] - S)
        elif how == "between the next two":
            after = upcoming[1] if len(upcoming) > 1 else upcoming[0] + 2 * MIN
            self.clock.ms = max(upcoming[0], (upcoming[0] + after) // 2 // S * S)
        else:
            self.clock.ms = upcoming[min(len(upcoming) - 1, data.draw(st.integers(1, 4), label="nth"))] + data.draw(
                st.sampled_from([0, S, MIN]), label="and")
        self.settle()

    # -- after every step ---------------------------------------------------------------

    def settle(self) -> None:
        """Drain the due-index at the current time (as the ticker does), then check what was
        published and what the slots hold against the model."""
        self.model.run_due(self.now)
        for _ in range(10):
            if self.run(self.arbitration.tick()) == 0:
                break
        else:
            raise AssertionError("the due-index does not drain")
        self.check_published()
        self.check_slots()

    def check_published(self) -> None:
        new = self.recorder.records[self.seen:]
        self.seen = len(self.recorder.records)
        statuses: list[StatusKey] = []
        orders: dict[str, list[OrderKey]] = {}
        for topic, ev in new:
            if isinstance(ev, StatusEventV1):
                assert topic == topics.STATUS.name
                key = (ev.command_id, ev.status, ev.reason, ev.superseded_by, ev.revert_of,
                       int(ev.cooldown_until.timestamp()) * 1000 if ev.cooldown_until else None)
                first = self.status_events.get(ev.event_id)
                if first is not None:  # published again (a replayed decision): the same event
                    again = (first.command_id, first.status, first.reason, first.superseded_by, first.revert_of,
                             int(first.cooldown_until.timestamp()) * 1000 if first.cooldown_until else None)
                    assert key == again, f"{ev.event_id} published again differently: {key} after {again}"
                    continue
                self.status_events[ev.event_id] = ev
                statuses.append(key)
                if ev.status in (CommandStatus.CANCELED, CommandStatus.FAILED):
                    assert ev.command_id not in self.terminal, (
                        f"{ev.command_id} ends twice: {self.terminal[ev.command_id].status}/{self.terminal[ev.command_id].reason}, "
                        f"then {ev.status}/{ev.reason}")
                    assert ev.command_id not in self.model.claimed, f"{ev.command_id} was claimed by dispatch, then {ev.status}/{ev.reason}"
                    self.terminal[ev.command_id] = ev
                if ev.status is CommandStatus.TRIGGERED:
                    assert ev.fence is not None
                    self.triggered_fence[ev.command_id] = ev.fence
                    if ev.revert_of is not None:
                        assert (ev.percentage, ev.type, ev.source) == (100, CommandType.LIMIT_PRODUCTION_POWER, "revert")
            else:
                assert isinstance(ev, DispatchOrderV1) and topic == topics.ORDERS.name
                first_order = self.order_events.get((ev.command_id, ev.fence))
                if first_order is not None:
                    assert first_order.model_dump(exclude={"ordered_at", "accepted_at"}) == ev.model_dump(
                        exclude={"ordered_at", "accepted_at"}), f"order {ev.command_id}/{ev.fence} published again differently"
                    continue
                assert ev.fence > self.last_fence.get(ev.entity_id, 0), (
                    f"order {ev.command_id} with fence {ev.fence} after fence {self.last_fence.get(ev.entity_id)} on {ev.entity_id}")
                assert self.triggered_fence.get(ev.command_id) == ev.fence, f"{ev.command_id}: ordered before Triggered, or another fence"
                if ev.revert_of is not None:  # its own window's revert, or one named after the command that left
                    assert ev.command_id.endswith(REVERT_SUFFIX) and ev.percentage == 100
                    assert ev.type is CommandType.LIMIT_PRODUCTION_POWER
                self.last_fence[ev.entity_id] = ev.fence
                self.order_events[(ev.command_id, ev.fence)] = ev
                self.orders.append(ev)
                orders.setdefault(ev.entity_id, []).append((ev.command_id, ev.revert_of, ev.percentage, ev.asset_identifiers))
        want_statuses, want_orders = self.model.take_expected()
        assert Counter(statuses) == Counter(want_statuses), (
            f"statuses published: {sorted(statuses, key=repr)}\nthe model expects: {sorted(want_statuses, key=repr)}")
        assert orders == want_orders, f"orders published: {orders}\nthe model expects: {want_orders}"

    def check_slots(self) -> None:
        records = self.run(Slots(self.client).read_many(ENTITIES))
        for entity, h in zip(ENTITIES, records, strict=True):
            slot = self.model.slots[entity]
            got = (h.active, h.scheduled, h.delivered, h.held, h.cooldown_until or 0)
            want = (slot.active.id if slot.active else None, slot.scheduled.spec.id if slot.scheduled else None,
                    slot.delivered, slot.held, slot.cooldown_until)
            assert got == want, f"{entity} at +{(self.now - T0_MS) // S}s: (active, scheduled, delivered, held, cooldownUntil) {got}, the model says {want}"
            if slot.active is not None:
                assert (h.active_end or "") == (str(slot.active.end) if slot.active.end is not None else "")


def test_the_slot_rules_hold_for_any_sequence_of_commands_claims_and_time(redis_url: str) -> None:
    SlotRules.redis_url = redis_url
    run_state_machine_as_test(SlotRules, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))
