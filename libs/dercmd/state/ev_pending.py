"""The EV aggregator's actions whose outcome dispatch still waits for, in Redis so that every dispatch replica
sees them (any replica may have sent the command, any takes its webhook, any polls).

Two keys under one hash tag (one slot: the actions in flight to an aggregator's vehicles are
few, thousands at most): a sorted set of members by when they are next polled, and a hash of
when each is given up. A member is ``[entity id, command id]`` as JSON: the command id is the
action's idempotency key, so the aggregator's own action id is never needed.

A poll *leases* what is due (its score moves one interval ahead, atomically, in Redis's
clock): two replicas never poll the same action in one interval, and an action whose poller
died is polled again an interval later. A member past its give-up time is dropped by the
lease instead: by then the status service's deadline sweeper has asked the backend itself.

Keys (written and read by dispatch's ``ev-aggregator`` backend only, through
:class:`PendingActions`; both expire twice the give-up time after the last add):

- ``dercmd:{ev-aggregator}:pending`` (sorted set): members scored by when they are next polled, ms;
- ``dercmd:{ev-aggregator}:pending-until`` (hash): member -> when it is given up, ms.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import redis.asyncio as aioredis

from .keys import CALL_TIMEOUT_S
from .scripts import Script, source

_POLL_KEY = "dercmd:{ev-aggregator}:pending"
_UNTIL_KEY = "dercmd:{ev-aggregator}:pending-until"

_ADD = source("ev_pending_add.lua")
_TAKE = source("ev_pending_take.lua")


def _member(entity_id: str, command_id: str) -> str:
    return json.dumps([entity_id, command_id], separators=(",", ":"))


def _parse(raw: bytes | str) -> tuple[str, str]:
    entity_id, command_id = json.loads(raw)
    return entity_id, command_id


class PendingActions:
    def __init__(self, redis: aioredis.Redis, *, first_poll_s: float, give_up_s: float) -> None:
        self._redis = redis
        self._add = Script(redis, _ADD)
        self._take = Script(redis, _TAKE)
        self._first_poll_ms = int(first_poll_s * 1000)
        self._give_up_ms = max(int(give_up_s * 1000), self._first_poll_ms + 1)

    async def add(self, commands: Sequence[tuple[str, str]]) -> None:
        """Wait for these ``(entity id, command id)``: first polled ``first_poll_s`` from now."""
        if commands:
            await self._add.run([_POLL_KEY, _UNTIL_KEY], [self._first_poll_ms, self._give_up_ms, *(_member(e, c) for e, c in commands)])

    async def take(self, limit: int, lease_s: float) -> list[tuple[str, str]]:
        """Lease up to ``limit`` due commands for ``lease_s`` (then they are due again)."""
        replies = await self._take.run([_POLL_KEY, _UNTIL_KEY], [limit, int(lease_s * 1000)])
        return [_parse(raw) for raw in replies]

    async def waiting(self) -> int:
        """How many actions are waited for (operations, tests)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return int(await self._redis.zcard(_POLL_KEY))

    async def remove(self, commands: Sequence[tuple[str, str]]) -> None:
        """Stop waiting for these (their outcome is known)."""
        if not commands:
            return
        members = [_member(e, c) for e, c in commands]
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(_POLL_KEY, *members)
        pipe.hdel(_UNTIL_KEY, *members)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await pipe.execute()
