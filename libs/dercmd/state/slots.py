"""Each entity's slots and each command's decision: the slot rules of BRIEF section 3
(``slots.lua``), the cooldown intake checks, and the abort intake records.

Keys (all of one entity under its hash tag, so one script call touches one Redis Cluster slot):

``dercmd:{entity}:slots`` (hash, no expiry). Field: what it holds (written by; read by):

- ``fence``: incremented by every slot change, an order's fence (slots.lua; slots.lua)
- ``active``: the active command's id, or its revert's (slots.lua; slots.lua)
- ``active_end``: the active command's endAt, ms, "" for none (slots.lua; slots.lua)
- ``active_fence``: ``fence`` when the active command last changed; dispatch refuses an order
  older than that (slots.lua; delivery.lua)
- ``scheduled``: the scheduled command's id (slots.lua; slots.lua)
- ``scheduled_start``: its startAt, ms (slots.lua; no script: for people and tests)
- ``cooldown_until``: when the entity's cooldown ends, ms (slots.lua; slots.lua, and intake's
  advisory check, :meth:`Slots.cooldowns_until`)
- ``delivered``: the active command dispatch claimed, which arbitration then never cancels
  (delivery.lua sets it, slots.lua clears it when the slot moves on; both read it)
- ``held``: the window the device holds now, set by the claim of a window; arbitration reverts
  it if the slot empties undelivered (delivery.lua sets and restores it, slots.lua clears it at
  a native window's end; both read it)
- ``held_before``: what ``held`` was before a claim still in flight, restored if that
  delivery does not get through (delivery.lua; delivery.lua)

Writers: arbitration (:meth:`Slots.run`, ``slots.lua``) and dispatch's claim (``delivery.lua``,
:mod:`.delivery`). Readers: the same scripts, and intake's cooldown check.

``dercmd:{entity}:decision:<command id>`` (string, JSON, expires ``STATE_TTL_S`` after the
command's last due time)
    What arbitration decided for the command (:class:`Decision`): ``outcome``, ``fence``,
    ``superseded``, ``cooldownUntil``, ``cmd`` (the :class:`Payload` of a scheduled or windowed
    command), ``at``, ``revert``, ``revertOf``, ``reason``, ``early``. Every operation records
    what it did there, so a repeated one replays it. Written by ``slots.lua`` (arbitration),
    and first by intake (:meth:`Slots.abort`: ``{"outcome": "aborted"}``) for a command it
    could not announce; read by ``slots.lua`` only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum

import redis.asyncio as aioredis

from dercmd.events import CommandAcceptedV1, CommandType, revert_id

from . import keys
from .keys import CALL_TIMEOUT_S, STATE_TTL_S
from .scripts import Script, source

_SCRIPT = source("slots.lua")


def to_ms(t: datetime) -> int:
    """A time as the scripts keep it: ms since the epoch."""
    return int(t.timestamp() * 1000)


def from_ms(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


class Outcome(StrEnum):
    """What an operation did (``slots.lua`` lists which operation answers which)."""

    ACTIVATED = "activated"
    SCHEDULED = "scheduled"
    COOLDOWN = "cooldown"
    EXPIRED = "expired"
    WAITING = "waiting"
    GONE = "gone"
    ENDED = "ended"
    LAPSED = "lapsed"
    CANCELED = "canceled"
    FINISHED = "finished"
    ABORTED = "aborted"  # recorded by intake (:meth:`Slots.abort`)
    UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class Payload:
    """What a scheduled or windowed command's dispatch order and revert are built from, kept
    with its decision in Redis (compact: a busy entity holds two)."""

    type: CommandType
    value: int | None
    percentage: int | None
    start_ms: int | None
    end_ms: int | None
    assets: tuple[str, ...] | None
    accepted_ms: int
    ignore_cooldown: bool
    expires_ms: int | None = None  # the caller's deadline (expiresAt)

    @classmethod
    def of(cls, cmd: CommandAcceptedV1) -> Payload:
        return cls(cmd.type, cmd.value, cmd.percentage, to_ms(cmd.trigger_time) if cmd.trigger_time else None,
                   to_ms(cmd.end_at) if cmd.end_at else None, cmd.asset_identifiers, to_ms(cmd.accepted_at), cmd.ignore_cooldown,
                   to_ms(cmd.expires_at) if cmd.expires_at else None)

    def encode(self) -> str:
        """``type|value|percentage|start|end|accepted[+expires]|ignore cooldown|assets``: ms
        times, empty for None, assets a JSON list (last, so it may hold any character). The
        script reads the end and the ignore flag. The deadline rides on the accepted time
        (``+<ms>``), so a payload written before it existed still reads."""
        def text(value: int | None) -> str:
            return "" if value is None else str(value)

        assets = json.dumps(list(self.assets), separators=(",", ":")) if self.assets is not None else ""
        accepted = str(self.accepted_ms) if self.expires_ms is None else f"{self.accepted_ms}+{self.expires_ms}"
        return "|".join((self.type.value, text(self.value), text(self.percentage), text(self.start_ms), text(self.end_ms),
                         accepted, "1" if self.ignore_cooldown else "", assets))

    @classmethod
    def decode(cls, raw: str) -> Payload:
        type_, value, percentage, start, end, accepted, ignore, assets = raw.split("|", 7)
        accepted, _, expires = accepted.partition("+")

        def number(text: str) -> int | None:
            return int(text) if text else None

        return cls(type=CommandType(type_), value=number(value), percentage=number(percentage), start_ms=number(start),
                   end_ms=number(end), assets=tuple(json.loads(assets)) if assets else None, accepted_ms=int(accepted),
                   ignore_cooldown=ignore == "1", expires_ms=number(expires))


@dataclass(frozen=True, slots=True)
class Decision:
    """A script's answer (see ``slots.lua`` for the outcomes of each operation)."""

    outcome: Outcome
    fence: int
    superseded: tuple[str, ...]
    cooldown_until: datetime | None
    duplicate: bool
    payload: Payload | None = None
    at_ms: int | None = None  # "waiting": when it is due again
    revert: str | None = None  # "ended" (and "lapsed", "canceled"): the revert dercmd dispatches
    revert_of: str | None = None  # what that revert returns the device from, when not the command itself
    reason: str | None = None  # "canceled": canceled | expired

    @classmethod
    def from_json(cls, raw: bytes | str) -> Decision:
        d = json.loads(raw)
        superseded = d.get("superseded") or []  # cjson writes an empty list as {}
        until = d.get("cooldownUntil") or 0
        return cls(
            outcome=Outcome(d["outcome"]),
            fence=int(d["fence"]),
            superseded=tuple(superseded) if isinstance(superseded, list) else (),
            cooldown_until=from_ms(until),
            duplicate=bool(d.get("duplicate")),
            payload=Payload.decode(d["cmd"]) if d.get("cmd") else None,
            at_ms=d.get("at"),
            revert=d.get("revert"),
            revert_of=d.get("revertOf"),
            reason=d.get("reason"),
        )


# -- the four operations -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decide:
    """A new command (rules 1-3). ``payload``: kept with its decision when it is needed later
    (a scheduled or windowed command)."""

    entity_id: str
    command_id: str
    start_ms: int | None
    end_ms: int | None
    cooldown_ms: int
    ignore_cooldown: bool
    payload: Payload | None

    @classmethod
    def of(cls, cmd: CommandAcceptedV1, cooldown_ms: int) -> Decide:
        start = cmd.trigger_time
        # Kept only where it is needed later: at its start (by Redis's clock) or its end.
        needed = start is not None or cmd.end_at is not None
        return cls(cmd.entity_id, cmd.id, to_ms(start) if start else None, to_ms(cmd.end_at) if cmd.end_at else None,
                   cooldown_ms, cmd.ignore_cooldown, Payload.of(cmd) if needed else None)

    def args(self) -> tuple[object, ...]:
        return (self.start_ms or 0, "" if self.end_ms is None else self.end_ms, self.cooldown_ms,
                "1" if self.ignore_cooldown else "0", STATE_TTL_S, self.payload.encode() if self.payload else "")


@dataclass(frozen=True, slots=True)
class Start:
    """A scheduled command came due (rule 4); ``due_ms``: when (its startAt, or the end of the
    cooldown it waited for)."""

    entity_id: str
    command_id: str
    cooldown_ms: int
    due_ms: int

    def args(self) -> tuple[object, ...]:
        return (self.cooldown_ms, self.due_ms)


@dataclass(frozen=True, slots=True)
class End:
    """An active window's end came (rule 5); ``native``: the backend keeps windows itself (no
    revert)."""

    entity_id: str
    command_id: str
    end_ms: int
    native: bool

    def args(self) -> tuple[object, ...]:
        return (self.end_ms, revert_id(self.command_id), STATE_TTL_S, "1" if self.native else "0")


@dataclass(frozen=True, slots=True)
class Cancel:
    """End a command early: ``reason`` canceled (a caller) or a deadline's; ``include_scheduled``
    takes it out of the scheduled slot too."""

    entity_id: str
    command_id: str
    reason: str
    include_scheduled: bool

    def args(self) -> tuple[object, ...]:
        return (self.reason, revert_id(self.command_id), "1" if self.include_scheduled else "0", STATE_TTL_S)


Operation = Decide | Start | End | Cancel
_OP = {Decide: "decide", Start: "start", End: "end", Cancel: "cancel"}


@dataclass(frozen=True, slots=True)
class SlotsRecord:
    """The slots hash as it is (every field; None where absent): for readers and tests."""

    fence: int | None = None
    active: str | None = None
    active_end: str | None = None
    active_fence: int | None = None
    scheduled: str | None = None
    scheduled_start: int | None = None
    cooldown_until: int | None = None
    delivered: str | None = None
    held: str | None = None
    held_before: str | None = None

    @classmethod
    def decode(cls, raw: dict[bytes, bytes]) -> SlotsRecord:
        values: dict[str, object] = {}
        for f in fields(cls):
            value = raw.get(f.name.encode())
            if value is not None:
                values[f.name] = int(value) if f.type == "int | None" else value.decode()
        return cls(**values)  # type: ignore[arg-type]


class Slots:
    """``now`` is None in production: the script then uses Redis's clock, one for all replicas."""

    def __init__(self, redis: aioredis.Redis, now: Callable[[], datetime] | None = None) -> None:
        self._redis = redis
        self._script = Script(redis, _SCRIPT)
        self._now = now

    async def run(self, ops: Sequence[Operation]) -> list[Decision]:
        """Run the operations in one round trip, in the order given (so one entity's are run
        in their order)."""
        now = to_ms(self._now()) if self._now else ""
        calls: list[tuple[list[str], list[object]]] = []
        for op in ops:
            call_keys = [keys.slots(op.entity_id), keys.decision(op.entity_id, op.command_id)]
            if isinstance(op, End | Cancel):  # they may make its revert active: the revert's own decision
                call_keys.append(keys.decision(op.entity_id, revert_id(op.command_id)))
            calls.append((call_keys, [_OP[type(op)], op.command_id, now, *op.args()]))
        return [Decision.from_json(raw) for raw in await self._script.run_many(calls)]

    async def cooldowns_until(self, entity_ids: Sequence[str]) -> list[datetime | None]:
        """When each entity's cooldown ends as arbitration last set it (None: never set), one
        round trip for all."""
        if not entity_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for entity_id in entity_ids:
            pipe.hget(keys.slots(entity_id), "cooldown_until")
        async with asyncio.timeout(CALL_TIMEOUT_S):
            replies = await pipe.execute()
        return [from_ms(int(raw or 0)) for raw in replies]

    async def abort(self, entity_id: str, command_id: str) -> bool:
        """Record the command as aborted before arbitration decides it, so that it never will.
        False if arbitration decided first."""
        aborted = json.dumps({"outcome": Outcome.ABORTED.value, "fence": 0, "superseded": [], "cooldownUntil": 0})
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return bool(await self._redis.set(keys.decision(entity_id, command_id), aborted, nx=True, ex=STATE_TTL_S))

    # -- readers (operations, tests, the bench) ------------------------------------------

    async def read_many(self, entity_ids: Sequence[str]) -> list[SlotsRecord]:
        pipe = self._redis.pipeline(transaction=False)
        for entity_id in entity_ids:
            pipe.hgetall(keys.slots(entity_id))
        async with asyncio.timeout(CALL_TIMEOUT_S):
            replies = await pipe.execute()
        return [SlotsRecord.decode(raw) for raw in replies]

    async def read(self, entity_id: str) -> SlotsRecord:
        (record,) = await self.read_many([entity_id])
        return record

    async def decision_ttl(self, entity_id: str, command_id: str) -> int:
        """Seconds the command's decision is still kept (Redis's TTL: -2 none, -1 no expiry)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return int(await self._redis.ttl(keys.decision(entity_id, command_id)))
