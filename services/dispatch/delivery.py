"""At-most-once delivery, per command, in Redis (see ``delivery.lua`` for the states)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis

from dercmd import redis_keys
from dercmd.events import CommandStatus

_SCRIPT = resources.files(__package__).joinpath("delivery.lua").read_text()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A terminal result, encoded into the delivery state as ``Status|reason|detail``."""

    status: CommandStatus
    reason: str | None = None
    detail: str | None = None

    def encode(self) -> str:
        return "|".join((self.status.value, self.reason or "", (self.detail or "").replace("|", "/")[:500]))

    @classmethod
    def decode(cls, raw: str) -> Outcome:
        status, reason, detail = (raw.split("|", 2) + ["", ""])[:3]
        return cls(CommandStatus(status), reason or None, detail or None)


class Deliveries:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_SCRIPT)

    async def _call(self, entity_id: str, command_id: str, *args: object) -> str:
        raw = await self._script(keys=[redis_keys.slots(entity_id), redis_keys.delivery(entity_id, command_id)], args=list(args))
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def claim(self, entity_id: str, command_id: str, fence: int) -> str:
        """"claimed" (deliver it), "stale" (a newer command owns the entity), or the state a
        previous attempt left: ``inflight``, ``accepted``, ``sent``, ``result:<o>``, ``done:<o>``."""
        return await self._call(entity_id, command_id, "claim", fence, redis_keys.STATE_TTL_S, command_id)

    async def accepted(self, entity_id: str, command_id: str) -> str:
        """The backend took it: "accepted", or the result that arrived first."""
        return await self._call(entity_id, command_id, "advance", "inflight", "accepted")

    async def sent(self, entity_id: str, command_id: str) -> str:
        """Sent is on the topic: "sent", or the result that arrived first."""
        return await self._call(entity_id, command_id, "advance", "accepted", "sent")

    async def result(self, entity_id: str, command_id: str, outcome: Outcome) -> str:
        return await self._call(entity_id, command_id, "result", outcome.encode())

    async def finish(self, entity_id: str, command_id: str, outcome: Outcome) -> None:
        await self._call(entity_id, command_id, "finish", outcome.encode())
