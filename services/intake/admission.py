"""Admitting a command, the same for REST and Kafka: check it against the fleet, write the
Pending row, then publish Pending and the accepted event, each acknowledged before the next,
so that the status topic shows Pending before anything downstream can say more."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as aioredis
from aiokafka.errors import KafkaError

from dercmd import redis_keys, topics
from dercmd.events import CommandAcceptedV1, CommandFields, CommandStateV1, CommandStatus, StatusEventV1, utcnow
from dercmd.fleet import Entity, Fleet
from dercmd.kafka import Publisher
from dercmd.ledger import Ledger

from . import metrics


@dataclass
class Refusal(Exception):
    """A command that will not be accepted; ``key`` is stable and goes to callers as is."""

    key: str
    message: str
    status: int = 400
    extra: dict[str, object] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class Admission:
    def __init__(self, fleet: Fleet, ledger: Ledger, publisher: Publisher, redis: aioredis.Redis) -> None:
        self.fleet = fleet
        self.ledger = ledger
        self.publisher = publisher
        self.redis = redis

    def check(self, entity: Entity, fields: CommandFields) -> None:
        if not self.fleet.supports(entity, fields.type):
            raise Refusal(
                "command_not_supported",
                f"{fields.type} is not supported by {entity.id} ({entity.kind}, {entity.vendor}, {entity.backend})",
            )

    async def abort(self, cmd: CommandAcceptedV1, why: str) -> bool:
        """For a command whose announcement failed: make sure arbitration will never act on
        it, and record it Failed. False if too late (arbitration already decided: the
        command is live after all)."""
        aborted = json.dumps({"outcome": "aborted", "fence": 0, "superseded": [], "cooldownUntil": 0})
        if not await self.redis.set(redis_keys.decision(cmd.entity_id, cmd.id), aborted, nx=True, ex=redis_keys.STATE_TTL_S):
            return False
        failed = StatusEventV1(command_id=cmd.id, entity_id=cmd.entity_id, status=CommandStatus.FAILED,
                               reason="intake_unavailable", detail=why)
        await asyncio.to_thread(self.ledger.apply, [failed])
        try:
            await self.publisher.publish(topics.STATUS, failed, cmd.entity_id)
        except KafkaError:
            pass  # the broker is what failed; the ledger has it
        return True

    async def known(self, command_id: str) -> bool:
        return await asyncio.to_thread(self.ledger.get, command_id) is not None

    async def check_cooldown(self, entity_id: str) -> None:
        """The cooldown as arbitration last set it. Advisory: arbitration decides atomically,
        so a command that slips past this check in the same instant is failed there."""
        raw = await self.redis.hget(redis_keys.slots(entity_id), "cooldown_until")
        until_ms = int(raw or 0)
        now = utcnow()
        if until_ms > now.timestamp() * 1000:
            until = datetime.fromtimestamp(until_ms / 1000, UTC)
            retry_after = max(1, int(-(-(until - now).total_seconds() // 1)))
            raise Refusal(
                "cooldown_active",
                f"{entity_id} is in its cooldown until {until.isoformat()}",
                status=409,
                extra={"cooldownUntil": until.isoformat()},
                headers={"Retry-After": str(retry_after)},
            )

    async def admit(self, cmd: CommandAcceptedV1) -> CommandStateV1:
        """Make the command durable and announce it; returns it as Pending.

        A command id already in the ledger is announced again only if it is the same command
        (a redelivered request: every step downstream drops what it has seen); an id reused
        for something else is refused with ``duplicate_id``."""
        started = time.perf_counter()
        if not await asyncio.to_thread(self.ledger.record_pending, cmd):
            existing = await asyncio.to_thread(self.ledger.get, cmd.id)
            if existing is None or (existing.entity_id, existing.type, existing.value) != (cmd.entity_id, cmd.type, cmd.value):
                raise Refusal("duplicate_id", f"command id {cmd.id} is taken by another command", status=409)
        pending = StatusEventV1(
            command_id=cmd.id,
            entity_id=cmd.entity_id,
            status=CommandStatus.PENDING,
            at=cmd.accepted_at,
            type=cmd.type,
            value=cmd.value,
            trigger_time=cmd.trigger_time or cmd.accepted_at,
            source=cmd.source,
        )
        await self.publisher.publish(topics.STATUS, pending, cmd.entity_id)
        await self.publisher.publish(topics.ACCEPTED, cmd, cmd.entity_id)
        metrics.ACCEPTED.labels(cmd.source).inc()
        metrics.ADMIT_SECONDS.labels(cmd.source).observe(time.perf_counter() - started)
        return CommandStateV1(
            id=cmd.id,
            entity_id=cmd.entity_id,
            status=CommandStatus.PENDING,
            type=cmd.type,
            value=cmd.value,
            trigger_time=pending.trigger_time,
            source=cmd.source,
            ignore_cooldown=cmd.ignore_cooldown,
            created_at=cmd.accepted_at,
            updated_at=cmd.accepted_at,
            accepted_at=cmd.accepted_at,
        )
