"""Admitting commands, the same for REST and Kafka: check each against the fleet, write the
Pending rows, then publish the Pending statuses and the accepted events, each acknowledged
before the next, so that the status topic shows Pending before anything downstream can say
more. Always in batches: a Kafka batch as it comes, REST requests by group commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from aiokafka.errors import KafkaError

from dercmd import topics
from dercmd.events import CommandAcceptedV1, CommandStateV1, CommandStatus, Event, StatusEventV1, utcnow
from dercmd.fleet import Fleet
from dercmd.group import GroupCommit
from dercmd.kafka import Publisher
from dercmd.ledger import Ledger
from dercmd.state.slots import Slots
from dercmd.web import ApiError

from . import metrics


class Refusal(ApiError):
    """A command that will not be accepted; ``key`` is stable and goes to callers as is (REST:
    the error envelope; Kafka: ``Rejected``'s reason and the dead letter's error)."""


class Admission:
    def __init__(self, fleet: Fleet, ledger: Ledger, publisher: Publisher, redis: aioredis.Redis, max_batch: int = 500) -> None:
        self.fleet = fleet
        self.ledger = ledger
        self.publisher = publisher
        self.redis = redis
        self.slots = Slots(redis)
        #: REST's way in: concurrent POSTs share ledger transactions and producer acks.
        self._group: GroupCommit[CommandAcceptedV1, CommandStateV1 | Refusal] = GroupCommit(self._admit_now, max_batch)

    async def abort(self, cmd: CommandAcceptedV1, why: str) -> bool:
        """For a command whose announcement failed: make sure arbitration will never act on
        it, and record it Failed. False if too late (arbitration already decided: the
        command is live after all)."""
        if not await self.slots.abort(cmd.entity_id, cmd.id):
            return False
        failed = StatusEventV1(command_id=cmd.id, entity_id=cmd.entity_id, status=CommandStatus.FAILED,
                               reason="intake_unavailable", detail=why)
        await asyncio.to_thread(self.ledger.apply, [failed])
        try:
            await self.publisher.publish(topics.STATUS, failed, cmd.entity_id)
        except KafkaError:
            pass  # the broker is what failed; the ledger has it
        return True

    async def known(self, command_ids: Sequence[str]) -> set[str]:
        """Which of these command ids the ledger holds."""
        return set(await asyncio.to_thread(self.ledger.get_many, list(command_ids))) if command_ids else set()

    async def cooldowns(self, cmds: Sequence[CommandAcceptedV1]) -> dict[str, Refusal]:
        """The commands (by id) whose entity is in its cooldown as arbitration last set it,
        one Redis round trip for all. Advisory: arbitration decides atomically, so a command
        that slips past this check in the same instant is failed there."""
        if not cmds:
            return {}
        untils = await self.slots.cooldowns_until([cmd.entity_id for cmd in cmds])
        now = utcnow()
        refused: dict[str, Refusal] = {}
        for cmd, until in zip(cmds, untils, strict=True):
            if until is not None and until > now:
                retry_after = max(1, int(-(-(until - now).total_seconds() // 1)))
                refused[cmd.id] = Refusal(
                    "cooldown_active",
                    f"{cmd.entity_id} is in its cooldown until {until.isoformat()}",
                    status=409,
                    extra={"cooldownUntil": until.isoformat()},
                    headers={"Retry-After": str(retry_after)},
                )
        return refused

    async def admit(self, cmd: CommandAcceptedV1) -> CommandStateV1:
        """Admit one command (REST): it joins the next group commit, which also checks the
        cooldown unless the command ignores it. Raises the command's :class:`Refusal`, or the
        broker's error when the announcement failed."""
        result = await self._group.submit(cmd)
        if isinstance(result, Refusal):
            raise result
        return result

    async def _admit_now(self, cmds: list[CommandAcceptedV1]) -> list[CommandStateV1 | Refusal]:
        """REST's group commit: cooldowns first (409 without a command), then admission. Only
        for a command due now: a later one meets the cooldown when it comes due (BRIEF 3)."""
        refused = await self.cooldowns([c for c in cmds if not c.ignore_cooldown and c.trigger_time is None])
        rest = [c for c in cmds if c.id not in refused]
        admitted = iter(await self.admit_many(rest) if rest else [])
        return [refused.get(c.id) or next(admitted) for c in cmds]

    async def admit_many(self, cmds: Sequence[CommandAcceptedV1]) -> list[CommandStateV1 | Refusal]:
        """Make commands durable and announce them: one ledger transaction, then every Pending
        acknowledged on the status topic, then every accepted event acknowledged. Returns, per
        command, its state as Pending or why it was refused.

        An id names one command, bound to its entity and to everything the request asked
        (:func:`_what`). A command id already in the ledger (or earlier in this batch) is
        announced again only if it is the same command (a redelivered or retried request:
        every step downstream drops what it has seen); an id reused for anything else is
        refused with ``duplicate_id`` and the command holding it is untouched. A ``Rejected``
        request holds no id (the ledger lets a new command take its row), so a valid request is
        accepted whether an invalid one with its id came before or after it."""
        started = time.perf_counter()
        inserted = await asyncio.to_thread(self.ledger.record_pending_many, cmds)
        earlier = [c.id for c in cmds if c.id not in inserted]
        existing = await asyncio.to_thread(self.ledger.get_many, earlier) if earlier else {}
        first: dict[str, CommandAcceptedV1] = {}
        out: list[CommandStateV1 | Refusal] = []
        statuses: list[tuple[topics.Topic, Event, str]] = []
        announcements: list[tuple[topics.Topic, Event, str]] = []
        for cmd in cmds:
            known = first.get(cmd.id) or existing.get(cmd.id)
            if known is not None and _what(known) != _what(cmd):
                out.append(Refusal("duplicate_id", f"command id {cmd.id} is taken by another command", status=409))
                continue
            first.setdefault(cmd.id, cmd)
            shown = _shown(cmd)
            pending = StatusEventV1(command_id=cmd.id, status=CommandStatus.PENDING, at=cmd.accepted_at, **shown)
            statuses.append((topics.STATUS, pending, cmd.entity_id))
            announcements.append((topics.ACCEPTED, cmd, cmd.entity_id))
            out.append(CommandStateV1(
                id=cmd.id, status=CommandStatus.PENDING, ignore_cooldown=cmd.ignore_cooldown,
                created_at=cmd.accepted_at, updated_at=cmd.accepted_at, accepted_at=cmd.accepted_at, **shown,
            ))
        await self.publisher.publish_all(statuses)
        await self.publisher.publish_all(announcements)
        elapsed = time.perf_counter() - started
        for cmd, result in zip(cmds, out, strict=True):
            if not isinstance(result, Refusal):
                metrics.ACCEPTED.labels(cmd.source).inc()
                metrics.ADMIT_SECONDS.labels(cmd.source).observe(elapsed)
        return out


def _what(cmd: CommandAcceptedV1 | CommandStateV1) -> tuple[object, ...]:
    """What makes two commands with one id the same command: the entity and everything the
    request asked (not when it was accepted, which differs for a redelivered request)."""
    if isinstance(cmd, CommandStateV1):
        # The ledger keeps an immediate command's trigger time as its acceptance time.
        trigger = None if cmd.trigger_time == cmd.accepted_at else cmd.trigger_time
    else:
        trigger = cmd.trigger_time
    assets = tuple(cmd.asset_identifiers) if cmd.asset_identifiers is not None else None
    return (cmd.entity_id, cmd.type, cmd.value, cmd.percentage, _instant(trigger), _instant(cmd.end_at), assets,
            _instant(cmd.expires_at), cmd.ignore_cooldown)


def _instant(at: datetime | None) -> float | None:
    return at.timestamp() if at is not None else None


def _shown(cmd: CommandAcceptedV1) -> dict[str, Any]:
    """What a Pending status event and the Pending state both show of a new command."""
    return {"entity_id": cmd.entity_id, "type": cmd.type, "value": cmd.value, "percentage": cmd.percentage,
            "trigger_time": cmd.trigger_time or cmd.accepted_at, "end_at": cmd.end_at,
            "asset_identifiers": cmd.asset_identifiers, "expires_at": cmd.expires_at, "source": cmd.source}
