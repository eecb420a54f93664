"""Recovery and deadlines, so that no command stays open for good (a lost record, a broker
that came back empty, a callback that never came, a service down at the wrong moment). The
ledger is the truth.

Every ``DERCMD_SWEEP_INTERVAL_S`` the sweeper asks the ledger for open commands that have not
moved for a while and hands each to the service that owns its state, through the same topics
as everything else. It asks only a ledger that is current: one that holds every status event
published before a moment (the status group's committed offsets have reached the topic's end
as it was then, :class:`LedgerMark`), and it judges "for a while" as of that moment. A status
service that restarts, or falls behind, would otherwise find the commands it has not caught up
on still Pending or Triggered and announce thousands of delivered commands again.

- Pending past its start, or Triggered, for ``DERCMD_RECOVER_AFTER_S``: announced again to
  arbitration, rebuilt from the ledger (a ``CommandAcceptedV1`` with its id). Arbitration
  repeats what it decided (the Triggered status and the dispatch order with the same fence)
  or, if it never saw it, decides it now; dispatch delivers each command at most once
  whatever it is ordered. A command waiting for its cooldown, and a revert (arbitration's
  own), are left to their deadline.
- Pending or Triggered past its stage deadline (``DERCMD_DEADLINE_PENDING_S`` /
  ``_TRIGGERED_S``) or the caller's ``expiresAt``: a ``CommandCancelV1`` with reason
  ``expired`` to arbitration, which ends it ``Failed: expired`` only if dispatch has not
  claimed it (the fence makes any order still on its way stale). A scheduled command waiting
  for its start or a cooldown is left alone unless its ``expiresAt`` passed.
- Sent without a result for ``DERCMD_DEADLINE_SENT_S``: a ``DeliveryCheckV1`` to dispatch,
  which asks the backend for the outcome where it can, else ends it ``Failed:
  no_confirmation``; through its delivery state, so a late callback cannot add a second
  terminal status.

Each decision is atomic in Redis where it is taken, so replicas of the status service could
all sweep safely; a Redis lease (:mod:`dercmd.state.leases`) still lets one sweep at a time, to
spare the work. A command handed on is handed on again only after ``REASK_S`` (a delivery
check) or ``DERCMD_RECOVER_AFTER_S`` (an announcement).

The caller's ``expiresAt`` is kept to the moment, not to the round: each round arms a timer for
every open command whose deadline comes before the next one (:meth:`Sweeper.arm_expiries`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import redis.asyncio as aioredis

from dercmd import topics
from dercmd.consumer import retrying
from dercmd.events import CommandAcceptedV1, CommandCancelV1, CommandStateV1, CommandStatus, DeliveryCheckV1, Event, utcnow
from dercmd.kafka import Publisher
from dercmd.ledger import Ledger
from dercmd.settings import StatusSettings
from dercmd.state.leases import SweeperLease

from . import metrics

log = logging.getLogger(__name__)

REASK_S = 30.0
BATCH = 1000
#: Expiries are armed this far beyond the next round, so none falls between two rounds.
_EXPIRY_MARGIN_S = 1.0


#: Per partition of the status topic: the status group's committed offsets and the log's ends
#: (:meth:`dercmd.consumer.BatchConsumer.group_offsets`); None while they are not known.
Offsets = tuple[dict[int, int], dict[int, int]] | None


class LedgerMark:
    """Up to when the ledger is complete. Each call gives the group's offsets now; the mark is
    the time the topic's ends were last noted. Once the group has committed up to those ends,
    every status event published before that time is in the ledger: the time is returned and
    the ends are noted again. Until then, None (and the mark stays, so a ledger that keeps
    up, however far behind, is swept every round or two)."""

    def __init__(self) -> None:
        self._mark: tuple[datetime, dict[int, int]] | None = None

    def step(self, offsets: Offsets, now: datetime) -> datetime | None:
        if offsets is None:
            return None
        committed, ends = offsets
        mark = self._mark
        if mark is not None and any(ends.get(p, 0) < end for p, end in mark[1].items()):
            mark = None  # a log shorter than when it was noted: the broker came back empty
        if mark is None:
            self._mark = (now, ends)
            return None
        if any(committed.get(p, 0) < end for p, end in mark[1].items()):
            return None
        self._mark = (now, ends)
        return mark[0]


class Sweeper:
    def __init__(self, settings: StatusSettings, ledger: Ledger, publisher: Publisher, redis: aioredis.Redis,
                 offsets: Callable[[], Awaitable[Offsets]]) -> None:
        self._settings = settings
        self._ledger = ledger
        self._publisher = publisher
        self._offsets = offsets
        self._mark = LedgerMark()
        self._lease_held = SweeperLease(redis, uuid.uuid4().hex)
        self._asked: dict[str, float] = {}  # command id -> monotonic time it was last asked about
        #: Per command whose expiresAt comes before the next round: the timer that ends it then,
        #: and then the task publishing that.
        self._expiries: dict[str, asyncio.TimerHandle | asyncio.Future[None]] = {}

    async def run(self) -> None:
        """Sweep every ``DERCMD_SWEEP_INTERVAL_S`` while this replica holds the lease."""
        interval = self._settings.sweep_interval_s
        try:
            while True:
                try:
                    if await self._lease(interval):
                        await retrying(self.sweep, "sweeper")
                        await retrying(lambda: self.arm_expiries(interval), "sweeper")
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug: try again next round
                    log.exception("sweep failed")
                await asyncio.sleep(interval)
        finally:
            for timer in self._expiries.values():
                timer.cancel()

    async def arm_expiries(self, interval: float) -> int:
        """Commands whose ``expiresAt`` comes before the next round are ended at that moment,
        not up to a round later: a timer each, which hands the command on to arbitration as
        ``expired`` (arbitration ends it ``Failed: expired`` unless dispatch has it, and
        dispatch never calls after it). The ledger need not be current for this: a cancel of
        a command that moved on meanwhile changes nothing. Returns the timers armed."""
        until = utcnow() + timedelta(seconds=interval + _EXPIRY_MARGIN_S)
        expiring = await asyncio.to_thread(self._ledger.expiring, until, limit=BATCH)
        loop = asyncio.get_running_loop()
        armed = 0
        for state in expiring:
            # (handed on already: a ledger that has not caught up still shows it open)
            if state.id in self._expiries or state.id in self._asked or state.expires_at is None:
                continue
            delay = max(0.0, (state.expires_at - utcnow()).total_seconds())
            self._expiries[state.id] = loop.call_later(delay, self._expire, state)
            armed += 1
        return armed

    def _expire(self, state: CommandStateV1) -> None:
        assert state.expires_at is not None
        record = self._request(state, state.expires_at)  # as a round at that moment would: the cancel
        assert record is not None
        self._asked[state.id] = time.monotonic()
        self._handed_on(state, record)

        async def publish() -> None:
            await retrying(lambda: self._publisher.publish_all([record]), "sweeper")

        # The loop keeps only a weak reference to a task: the timer's entry holds it until done.
        task = asyncio.ensure_future(publish())
        self._expiries[state.id] = task
        task.add_done_callback(lambda _: self._expiries.pop(state.id, None))

    async def _lease(self, interval: float) -> bool:
        """Hold the sweeper's lease for the next few rounds (or keep holding it)."""
        return await self._lease_held.hold(int(interval * 3000))

    async def sweep(self) -> int:
        """One round; the number of commands handed on (none while the ledger is behind)."""
        s = self._settings
        now = self._mark.step(await self._offsets(), utcnow())
        metrics.SWEEPS.labels("ledger_behind" if now is None else "swept").inc()
        if now is None:
            return 0
        recover = s.recover_after_s
        overdue = await asyncio.to_thread(
            self._ledger.overdue, now, pending_s=min(recover, s.deadline_pending_s),
            triggered_s=min(recover, s.deadline_triggered_s), sent_s=s.deadline_sent_s, limit=BATCH,
        )
        clock = time.monotonic()
        self._asked = {cid: t for cid, t in self._asked.items() if clock - t < max(REASK_S, recover)}
        records: list[tuple[topics.Topic, Event, str]] = []
        for state in overdue:
            asked = self._asked.get(state.id)
            if asked is not None and clock - asked < (REASK_S if state.status is CommandStatus.SENT else recover):
                continue
            record = self._request(state, now)
            if record is None:
                continue
            self._asked[state.id] = clock
            records.append(record)
            self._handed_on(state, record)
        await self._publisher.publish_all(records)
        return len(records)

    @staticmethod
    def _handed_on(state: CommandStateV1, record: tuple[topics.Topic, Event, str]) -> None:
        action = _ACTIONS[type(record[1]).__name__]
        metrics.SWEPT.labels(state.status.value, action).inc()
        log.info("handed on", extra={"command_id": state.id, "entity_id": state.entity_id, "status": state.status.value,
                                     "action": action})

    def _request(self, state: CommandStateV1, now: datetime) -> tuple[topics.Topic, Event, str] | None:
        if state.status is CommandStatus.SENT:
            return (topics.ORDERS, DeliveryCheckV1(command_id=state.id, entity_id=state.entity_id, at=now), state.entity_id)
        caller = state.expires_at is not None and state.expires_at <= now
        pending = state.status is CommandStatus.PENDING
        limit = self._settings.deadline_pending_s if pending else self._settings.deadline_triggered_s
        since = (state.trigger_time if pending else state.triggered_at) or state.updated_at
        if caller or now - since > timedelta(seconds=limit):
            stage = "Pending" if pending else "Triggered"
            detail = ("its expiresAt passed before it was delivered" if caller
                      else f"{stage} for more than {timedelta(seconds=limit)} past its start")
            cancel = CommandCancelV1(command_id=state.id, entity_id=state.entity_id, reason="expired", detail=detail,
                                     include_scheduled=caller, at=now)
            return (topics.ACCEPTED, cancel, state.entity_id)
        if state.revert_of is not None or state.type is None or (state.cooldown_until is not None and state.cooldown_until > now):
            return None  # arbitration's own revert, or waiting for its cooldown: its deadline decides
        return (topics.ACCEPTED, announcement(state), state.entity_id)


#: What the sweeper did, for its metric's label.
_ACTIONS = {"DeliveryCheckV1": "delivery_check", "CommandCancelV1": "expired", "CommandAcceptedV1": "announced_again"}


def announcement(state: CommandStateV1) -> CommandAcceptedV1:
    """The accepted event intake published for a command, rebuilt from its ledger row."""
    assert state.type is not None and state.accepted_at is not None
    immediate = state.trigger_time is None or state.trigger_time == state.accepted_at
    return CommandAcceptedV1(
        id=state.id, entity_id=state.entity_id, type=state.type, value=state.value, percentage=state.percentage,
        trigger_time=None if immediate else state.trigger_time, end_at=state.end_at,
        asset_identifiers=state.asset_identifiers, expires_at=state.expires_at, ignore_cooldown=state.ignore_cooldown,
        accepted_at=state.accepted_at, source=state.source or "recovered", recovered=True,
    )
