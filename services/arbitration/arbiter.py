"""The slot rules and the cooldown, as one Redis script call per command (pipelined per batch),
and what each decision emits. Knows nothing of Kafka: give it a Redis client, a fleet and a clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

import redis.asyncio as aioredis

from dercmd import redis_keys, topics
from dercmd.events import CommandAcceptedV1, CommandStatus, DispatchOrderV1, Event, StatusEventV1
from dercmd.fleet import Fleet

_SCRIPT = resources.files(__package__).joinpath("arbitrate.lua").read_text()


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str  # activated | scheduled | cooldown | expired | aborted (by intake: emits nothing)
    fence: int
    superseded: tuple[str, ...]
    cooldown_until: datetime | None
    duplicate: bool

    @classmethod
    def from_json(cls, raw: bytes | str) -> Decision:
        d = json.loads(raw)
        superseded = d.get("superseded") or []  # cjson writes an empty list as {}
        until = d.get("cooldownUntil") or 0
        return cls(
            outcome=d["outcome"],
            fence=int(d["fence"]),
            superseded=tuple(superseded) if isinstance(superseded, list) else (),
            cooldown_until=datetime.fromtimestamp(until / 1000, UTC) if until else None,
            duplicate=bool(d.get("duplicate")),
        )


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


Records = list[tuple[topics.Topic, Event, str]]


class Arbiter:
    """``now`` is None in production: the script then uses Redis's clock, one for all replicas."""

    def __init__(
        self,
        redis: aioredis.Redis,
        fleet: Fleet,
        default_cooldown_s: float,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._fleet = fleet
        self._default_cooldown_s = default_cooldown_s
        self._now = now

    async def decide(self, cmd: CommandAcceptedV1) -> Decision:
        (decision,) = await self.decide_many([cmd])
        return decision

    async def decide_many(self, cmds: Sequence[CommandAcceptedV1]) -> list[Decision]:
        """Decide commands in one Redis round trip: one script call each, pipelined and run
        in the order given, so one entity's commands are decided in their order."""
        pipe = self._redis.pipeline(transaction=False)
        now = _ms(self._now()) if self._now else ""
        for cmd in cmds:
            entity = self._fleet.entity(cmd.entity_id)
            cooldown_s = self._fleet.cooldown_s(entity, self._default_cooldown_s) if entity else self._default_cooldown_s
            await self._script(  # queued on the pipeline, not sent yet
                keys=[redis_keys.slots(cmd.entity_id), redis_keys.decision(cmd.entity_id, cmd.id)],
                args=[
                    cmd.id,
                    now,
                    _ms(cmd.trigger_time) if cmd.trigger_time else 0,
                    _ms(cmd.end_at) if cmd.end_at else "",
                    int(cooldown_s * 1000),
                    "1" if cmd.ignore_cooldown else "0",
                    redis_keys.STATE_TTL_S,
                ],
                client=pipe,
            )
        async with asyncio.timeout(redis_keys.CALL_TIMEOUT_S):
            replies = await pipe.execute()
        return [Decision.from_json(raw) for raw in replies]


def emissions(cmd: CommandAcceptedV1, decision: Decision, now: datetime) -> tuple[Records, Records]:
    """What a decision publishes, in two steps: the first must be acknowledged before the
    second is sent, so that ``Triggered`` is on the status topic before dispatch can say ``Sent``."""
    status = topics.STATUS
    key = cmd.entity_id
    first: Records = [
        (
            status,
            StatusEventV1(
                command_id=old,
                entity_id=key,
                status=CommandStatus.CANCELED,
                reason="superseded",
                superseded_by=cmd.id,
                at=now,
            ),
            key,
        )
        for old in decision.superseded
        if old != cmd.id
    ]
    if decision.outcome == "activated":
        first.append(
            (status, StatusEventV1(command_id=cmd.id, entity_id=key, status=CommandStatus.TRIGGERED, fence=decision.fence, at=now), key)
        )
        order = DispatchOrderV1(
            command_id=cmd.id,
            entity_id=key,
            type=cmd.type,
            value=cmd.value,
            fence=decision.fence,
            accepted_at=cmd.accepted_at,
            ordered_at=now,
        )
        return first, [(topics.ORDERS, order, key)]
    if decision.outcome == "cooldown":
        first.append(
            (
                status,
                StatusEventV1(
                    command_id=cmd.id,
                    entity_id=key,
                    status=CommandStatus.FAILED,
                    reason="cooldown_active",
                    cooldown_until=decision.cooldown_until,
                    detail=f"cooldown active until {decision.cooldown_until.isoformat() if decision.cooldown_until else '?'}",
                    at=now,
                ),
                key,
            )
        )
    elif decision.outcome == "expired":
        first.append(
            (status, StatusEventV1(command_id=cmd.id, entity_id=key, status=CommandStatus.CANCELED, reason="expired", at=now), key)
        )
    # "scheduled": stays Pending until its start (the due-index comes with scheduled commands).
    return first, []
