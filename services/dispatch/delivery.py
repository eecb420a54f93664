"""At-most-once delivery, per command, in Redis (see ``delivery.lua`` for the states)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as aioredis

from dercmd.state import keys as redis_keys
from dercmd.events import CommandStatus
from dercmd.state.scripts import Script

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


Key = tuple[str, str]  # (entity id, command id)


class Deliveries:
    """Each method comes in a batch form (one Redis round trip for many commands, run in the
    order given) and a one-command form."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._script = Script(redis, _SCRIPT)

    async def _call_many(self, calls: Sequence[tuple[Key, Sequence[object]]]) -> list[str]:
        replies = await self._script.run_many(
            [([redis_keys.slots(entity_id), redis_keys.delivery(entity_id, command_id)], args)
             for (entity_id, command_id), args in calls]
        )
        return [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in replies]

    async def claim_many(self, orders: Sequence[tuple[Key, int, bool]]) -> list[str]:
        """Per ``((entity, command), fence, window)``: "claimed" (deliver it), "stale" (a
        newer command owns the entity), or the state a previous attempt left: ``inflight``,
        ``accepted``, ``sent``, ``result:<o>``, ``done:<o>``. ``window``: the command holds the
        device until its end (what arbitration must revert if nothing newer reaches it)."""
        return await self._call_many([(key, ("claim", fence, redis_keys.STATE_TTL_S, key[1], "1" if window else "0"))
                                      for key, fence, window in orders])

    async def advance_many(self, keys: Sequence[Key], from_state: str, to_state: str) -> list[str]:
        """``to_state`` where the state was ``from_state``, else the state found (a result that
        arrived first, or what another attempt recorded). inflight -> accepted: the backend took
        it; accepted -> sent: Sent is on the topic."""
        return await self._call_many([(key, ("advance", from_state, to_state)) for key in keys])

    async def retry_many(self, orders: Sequence[tuple[Key, int]]) -> list[str]:
        """Commands the backend did not take, per ``((entity, command), fence)``: "retry" (it
        may be claimed again), "superseded" (a newer command took the slot meanwhile: done as
        Canceled, to be reported), or the state found."""
        return await self._call_many([(key, ("retry", key[1], fence)) for key, fence in orders])

    async def abandon_many(self, orders: Sequence[tuple[Key, int, Outcome]]) -> list[str]:
        """Orders not delivered by their deadline, per ``((entity, command), fence, outcome)``:
        "abandoned" (recorded as done with the outcome: publish it), "stale" (arbitration
        reported it), or the state found."""
        return await self._call_many([(key, ("abandon", fence, outcome.encode(), redis_keys.STATE_TTL_S, key[1]))
                                      for key, fence, outcome in orders])

    async def result_many(self, results: Sequence[tuple[Key, Outcome]]) -> list[str]:
        """A backend's asynchronous results: "emit" (Sent is out: publish it), "deferred" (the
        sender publishes it after Sent), or the state found. With no state at all (Redis lost
        it), the result is recorded and "emit"."""
        return await self._call_many([(key, ("result", outcome.encode(), redis_keys.STATE_TTL_S)) for key, outcome in results])

    async def finish_many(self, results: Sequence[tuple[Key, Outcome]]) -> None:
        """Record terminal results after they are published."""
        await self._call_many([(key, ("finish", outcome.encode(), redis_keys.STATE_TTL_S)) for key, outcome in results])

    async def peek_many(self, keys: Sequence[Key]) -> list[str]:
        """The states found, changing nothing ("missing" where there is none)."""
        return await self._call_many([(key, ("peek",)) for key in keys])

    async def claim(self, entity_id: str, command_id: str, fence: int, window: bool = False) -> str:
        return (await self.claim_many([((entity_id, command_id), fence, window)]))[0]

    async def accepted(self, entity_id: str, command_id: str) -> str:
        return (await self.advance_many([(entity_id, command_id)], "inflight", "accepted"))[0]

    async def sent(self, entity_id: str, command_id: str) -> str:
        return (await self.advance_many([(entity_id, command_id)], "accepted", "sent"))[0]

    async def result(self, entity_id: str, command_id: str, outcome: Outcome) -> str:
        return (await self.result_many([((entity_id, command_id), outcome)]))[0]

    async def finish(self, entity_id: str, command_id: str, outcome: Outcome) -> None:
        await self.finish_many([((entity_id, command_id), outcome)])
