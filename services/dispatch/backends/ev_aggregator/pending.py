"""The actions whose outcome dispatch still waits for, in Redis so that every dispatch replica
sees them (any replica may have sent the command, any takes its webhook, any polls).

Two keys under one hash tag (one slot: the actions in flight to an aggregator's vehicles are
few, thousands at most): a sorted set of members by when they are next polled, and a hash of
when each is given up. A member is ``[entity id, command id]`` as JSON: the command id is the
action's idempotency key, so the aggregator's own action id is never needed.

A poll *leases* what is due (its score moves one interval ahead, atomically, in Redis's
clock): two replicas never poll the same action in one interval, and an action whose poller
died is polled again an interval later. A member past its give-up time is dropped by the
lease instead: by then the status service's deadline sweeper has asked the backend itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import redis.asyncio as aioredis

from dercmd.state import keys as redis_keys
from dercmd.state.scripts import Script

POLL_KEY = "dercmd:{ev-aggregator}:pending"
UNTIL_KEY = "dercmd:{ev-aggregator}:pending-until"

# KEYS[1] the poll set, KEYS[2] the give-up hash; ARGV[1] first poll after ms, ARGV[2] give up
# after ms, then members. Times are Redis's (TIME): hosts may disagree.
_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], now + tonumber(ARGV[2]))
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
return #ARGV - 2
"""

# KEYS as above; ARGV[1] most members, ARGV[2] lease ms. Returns the members leased.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local taken = {}
for _, member in ipairs(due) do
  local give_up = tonumber(redis.call('HGET', KEYS[2], member))
  if give_up == nil or give_up <= now then
    redis.call('ZREM', KEYS[1], member)
    redis.call('HDEL', KEYS[2], member)
  else
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), member)
    taken[#taken + 1] = member
  end
end
return taken
"""


def member(entity_id: str, command_id: str) -> str:
    return json.dumps([entity_id, command_id], separators=(",", ":"))


def parse(raw: bytes | str) -> tuple[str, str]:
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
            await self._add.run([POLL_KEY, UNTIL_KEY], [self._first_poll_ms, self._give_up_ms, *(member(e, c) for e, c in commands)])

    async def take(self, limit: int, lease_s: float) -> list[tuple[str, str]]:
        """Lease up to ``limit`` due commands for ``lease_s`` (then they are due again)."""
        replies = await self._take.run([POLL_KEY, UNTIL_KEY], [limit, int(lease_s * 1000)])
        return [parse(raw) for raw in replies]

    async def remove(self, commands: Sequence[tuple[str, str]]) -> None:
        """Stop waiting for these (their outcome is known)."""
        if not commands:
            return
        members = [member(e, c) for e, c in commands]
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(POLL_KEY, *members)
        pipe.hdel(UNTIL_KEY, *members)
        async with asyncio.timeout(redis_keys.CALL_TIMEOUT_S):
            await pipe.execute()
