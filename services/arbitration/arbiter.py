"""The slot rules as arbitration applies them: which slot operation each event is
(:mod:`dercmd.state.slots` runs them, one Redis script call per command, pipelined per
batch), what the due-index must then hold, and what each decision emits. Knows nothing of
Kafka: give it a Redis client, a fleet and a clock.

Four operations, all on one entity's keys only (so they work on Redis Cluster):

- ``decide`` a new command (rules 1-3);
- ``start`` a scheduled command whose startAt came (rule 4), and
- ``end`` an active window whose endAt came (rule 5), both driven by the due-index;
- ``cancel`` a command (a caller's DELETE, or a deadline the status service's sweeper saw).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis

from dercmd import topics
from dercmd.events import (
    DEFAULT_PERCENTAGE,
    CommandAcceptedV1,
    CommandCancelV1,
    CommandStatus,
    CommandType,
    DispatchOrderV1,
    Event,
    StatusEventV1,
)
from dercmd.fleet import Fleet
from dercmd.state.due import Due
from dercmd.state.slots import Cancel, Decide, Decision, End, Operation, Outcome, Payload, Slots, Start
from dercmd.state.slots import from_ms as _time
from dercmd.state.slots import to_ms as _ms

__all__ = ["Arbiter", "Decision", "Outcome", "Payload", "Records", "cancel_emissions", "emissions", "fire_emissions"]


Records = list[tuple[topics.Topic, Event, str]]


class Arbiter:
    """``now`` is None in production: the scripts then use Redis's clock, one for all replicas."""

    def __init__(
        self,
        redis: aioredis.Redis,
        fleet: Fleet,
        default_cooldown_s: float,
        now: Callable[[], datetime] | None = None,
        due: Due | None = None,
    ) -> None:
        self._slots = Slots(redis, now=now)
        self._fleet = fleet
        self._default_cooldown_s = default_cooldown_s
        self._now = now
        self.due = due or Due(redis, now=now)

    def now(self) -> datetime:
        """This host's time (the injected clock in tests): what events are stamped with. The
        scripts decide by Redis's."""
        return self._now() if self._now else datetime.now(UTC)

    def _cooldown_ms(self, entity_id: str) -> int:
        entity = self._fleet.entity(entity_id)
        cooldown_s = self._fleet.cooldown_s(entity, self._default_cooldown_s) if entity else self._default_cooldown_s
        return int(cooldown_s * 1000)

    async def decide(self, cmd: CommandAcceptedV1) -> Decision:
        (decision,) = await self.decide_many([cmd])
        return decision

    async def decide_many(self, events: Sequence[CommandAcceptedV1 | CommandCancelV1]) -> list[Decision]:
        """Decide new commands and cancels in one Redis round trip, in the order given (so one
        entity's are decided in their order), then put what they scheduled on the due-index."""
        ops: list[Operation] = [self._cancel(ev) if isinstance(ev, CommandCancelV1) else Decide.of(ev, self._cooldown_ms(ev.entity_id))
                                for ev in events]
        decisions = await self._slots.run(ops)
        await self.due.add_many(self._due_entries(events, decisions))
        return decisions

    @staticmethod
    def _cancel(ev: CommandCancelV1) -> Cancel:
        # A stage deadline leaves a scheduled command alone (it is waiting for its start or a
        # cooldown, the due-index will act); a caller's cancel or expiresAt does not.
        # A delivered window the caller ends early is reverted on every backend: one that keeps
        # windows natively would hold it until its endAt.
        return Cancel(ev.entity_id, ev.command_id, ev.reason, ev.include_scheduled)

    @staticmethod
    def _due_entries(events: Sequence[CommandAcceptedV1 | CommandCancelV1], decisions: Sequence[Decision]) -> list[Due.Entry]:
        """What the due-index must hold after these decisions: a scheduled command's start, an
        activated window's end. Added again for a repeated decision (it may have been lost)."""
        entries: list[Due.Entry] = []
        for ev, d in zip(events, decisions, strict=True):
            if isinstance(ev, CommandCancelV1):
                continue
            if d.outcome is Outcome.SCHEDULED and ev.trigger_time is not None:
                entries.append(Due.Entry("s", ev.entity_id, ev.id, _ms(ev.trigger_time)))
            elif d.outcome is Outcome.ACTIVATED and ev.end_at is not None:
                entries.append(Due.Entry("e", ev.entity_id, ev.id, _ms(ev.end_at)))
        return entries

    def holds_windows(self, entity_id: str) -> bool:
        entity = self._fleet.entity(entity_id)
        return entity is not None and self._fleet.keeps_windows(entity)

    async def fire(self, entries: Sequence[Due.Entry]) -> list[Decision]:
        """Run what the due-index says has come: starts and ends, in one round trip; then put
        the ends of the windows that started on the index (before the starts' entries go)."""
        ops: list[Operation] = [Start(e.entity_id, e.command_id, self._cooldown_ms(e.entity_id), e.due) if e.kind == "s"
                                else End(e.entity_id, e.command_id, e.at_ms, self.holds_windows(e.entity_id))
                                for e in entries]
        decisions = await self._slots.run(ops)
        await self.due.add_many([Due.Entry("e", e.entity_id, e.command_id, d.payload.end_ms)
                                 for e, d in zip(entries, decisions, strict=True)
                                 if e.kind == "s" and d.outcome is Outcome.ACTIVATED and d.payload and d.payload.end_ms])
        return decisions


# -- what decisions emit ----------------------------------------------------------------


def _status(command_id: str, entity_id: str, status: CommandStatus, now: datetime, **fields: object) -> tuple[topics.Topic, Event, str]:
    return (topics.STATUS, StatusEventV1(command_id=command_id, entity_id=entity_id, status=status, at=now, **fields), entity_id)


def _superseded(entity_id: str, decision: Decision, by: str, now: datetime) -> Records:
    return [_status(old, entity_id, CommandStatus.CANCELED, now, reason="superseded", superseded_by=by)
            for old in decision.superseded if old != by]


def _activation(entity_id: str, command_id: str, payload: Payload, decision: Decision, now: datetime,
                not_before: datetime | None = None, recovered: bool = False) -> tuple[Records, Records]:
    """Triggered, then the dispatch order."""
    order = DispatchOrderV1(
        command_id=command_id, entity_id=entity_id, type=payload.type, value=payload.value, percentage=payload.percentage,
        fence=decision.fence, accepted_at=_time(payload.accepted_ms) or now, ordered_at=now,
        start_at=_time(payload.start_ms) if payload.end_ms else None, end_at=_time(payload.end_ms),
        asset_identifiers=payload.assets, not_before=not_before, recovered=recovered, expires_at=_time(payload.expires_ms),
    )
    triggered = _status(command_id, entity_id, CommandStatus.TRIGGERED, now, fence=decision.fence)
    return [triggered], [(topics.ORDERS, order, entity_id)]


def _revert(entity_id: str, of: str, payload: Payload | None, decision: Decision, now: datetime,
            not_before: datetime | None = None) -> tuple[Records, Records]:
    """The revert of an ended window, a command of its own: its first event makes its row.
    When the slot emptied of a command never delivered, it reverts the window the device
    still holds (``decision.revert_of``), for all its assets."""
    assert decision.revert is not None
    if decision.revert_of is not None and decision.revert_of != of:
        of, payload = decision.revert_of, None
    assets = payload.assets if payload else None
    fields = {"type": CommandType.LIMIT_PRODUCTION_POWER, "percentage": DEFAULT_PERCENTAGE, "asset_identifiers": assets}
    triggered = _status(decision.revert, entity_id, CommandStatus.TRIGGERED, now, fence=decision.fence, revert_of=of,
                        trigger_time=now, source="revert", **fields)
    order = DispatchOrderV1(command_id=decision.revert, entity_id=entity_id, fence=decision.fence, accepted_at=now,
                            ordered_at=now, revert_of=of, not_before=not_before, **fields)  # type: ignore[arg-type]
    return [triggered], [(topics.ORDERS, order, entity_id)]


def emissions(cmd: CommandAcceptedV1, decision: Decision, now: datetime) -> tuple[Records, Records]:
    """What deciding a new command publishes, in two steps: the first must be acknowledged
    before the second is sent, so that ``Triggered`` is on the status topic before dispatch
    can say ``Sent``."""
    key = cmd.entity_id
    first = _superseded(key, decision, cmd.id, now)
    if decision.outcome is Outcome.ACTIVATED:
        before, then = _activation(key, cmd.id, decision.payload or Payload.of(cmd), decision, now, recovered=cmd.recovered)
        return first + before, then
    if decision.outcome is Outcome.COOLDOWN:
        until = decision.cooldown_until
        first.append(_status(cmd.id, key, CommandStatus.FAILED, now, reason="cooldown_active", cooldown_until=until,
                             detail=f"cooldown active until {until.isoformat() if until else '?'}"))
    elif decision.outcome is Outcome.EXPIRED:
        first.append(_status(cmd.id, key, CommandStatus.CANCELED, now, reason="expired", detail="its endAt had passed"))
    # "scheduled": stays Pending until its start; "aborted"/"canceled": intake or a cancel
    # said what there is to say.
    return first, []


def fire_emissions(entry: Due.Entry, decision: Decision, now: datetime, hold: bool = True) -> tuple[Records, Records]:
    """What a start or an end from the due-index publishes. Taken up to the lead ahead of its
    time, the order says not to send it before that time (``hold``; a backend that keeps
    windows gets the window at once: it starts the window itself)."""
    key, command_id = entry.entity_id, entry.command_id
    # Times in the index are whole ms, cut: a ms later is never before the caller's time.
    due = _time(entry.due + 1) if hold and entry.due > _ms(now) else None
    if entry.kind == "s":
        if decision.outcome is Outcome.ACTIVATED and decision.payload is not None:
            before, then = _activation(key, command_id, decision.payload, decision, now, not_before=due)
            return _superseded(key, decision, command_id, now) + before, then
        if decision.outcome is Outcome.EXPIRED:
            return [_status(command_id, key, CommandStatus.CANCELED, now, reason="expired",
                            detail="its endAt passed while it waited for the cooldown to end")], []
        return [], []  # waiting (due again later) or gone (superseded or canceled since)
    if decision.outcome is Outcome.ENDED and decision.revert:
        return _revert(key, command_id, decision.payload, decision, now, not_before=due)
    if decision.outcome is Outcome.LAPSED:
        lapsed = _status(command_id, key, CommandStatus.CANCELED, now, reason="expired",
                         detail="its window ended before it could be delivered")
        before, then = _revert(key, command_id, None, decision, now) if decision.revert else ([], [])
        return [lapsed, *before], then
    return [], []


def cancel_emissions(ev: CommandCancelV1, decision: Decision, now: datetime) -> tuple[Records, Records]:
    """What a cancel publishes: the command's end (if it had not been delivered), or the
    revert of a delivered window it ended early."""
    key = ev.entity_id
    if decision.outcome is Outcome.CANCELED:
        # A repeated cancel (redelivered, or a DELETE and a deadline both on their way) repeats
        # what the first one decided, whatever its own reason.
        reason = decision.reason or ev.reason
        if reason == "canceled":
            ended = _status(ev.command_id, key, CommandStatus.CANCELED, now, reason="canceled",
                            detail=f"canceled by {ev.by}" if ev.by else "canceled")
        else:
            ended = _status(ev.command_id, key, CommandStatus.FAILED, now, reason=reason, detail=ev.detail)
        before, then = _revert(key, ev.command_id, None, decision, now) if decision.revert else ([], [])
        return [ended, *before], then
    if decision.outcome is Outcome.ENDED and decision.revert:
        return _revert(key, ev.command_id, decision.payload, decision, now)
    return [], []
