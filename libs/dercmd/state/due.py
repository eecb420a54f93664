"""The due-index: when each scheduled command starts and each active window ends.

Redis sorted sets scored by the time (ms), split into ``BUCKETS`` keys by a hash of the
entity, each key its own hash tag (``dercmd:due:{07}``), so the index spreads over a Redis
Cluster. An entry only says "look at this entity then": the slots hash stays the truth, and
the ``start``/``end`` scripts check it, so an entry left behind by a superseded or canceled
command does nothing.

Every arbitration replica polls the index. ``take`` leases the entries that have come due
(their score moves ``LEASE_MS`` ahead, atomically), so one replica acts on each; the entry is
removed only after what it caused is published. A replica that dies in between leaves the
lease to run out, and another takes the entry again; the scripts remember what they did, so
that second time re-publishes the same events (consumers drop copies) and changes nothing.
Times come from Redis's clock (``TIME`` in the scripts): hosts may disagree by seconds.

Keys: ``dercmd:due:{NN}`` (sorted sets, ``NN`` 00-15; no expiry), members
``kind|command id|at ms|entity id`` (:class:`Entry`) scored by when they are due. Written by
arbitration (:meth:`Due.add_many`, :meth:`Due.settle`, ``due_take.lua``'s lease), read by
arbitration only.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import redis.asyncio as aioredis

from .keys import CALL_TIMEOUT_S
from .scripts import Script, source

BUCKETS = 16
LEASE_MS = 10_000

_TAKE = source("due_take.lua")


def _bucket_key(bucket: int) -> str:
    return f"dercmd:due:{{{bucket:02d}}}"


def bucket_of(entity_id: str) -> int:
    return zlib.crc32(entity_id.encode()) % BUCKETS


@dataclass(frozen=True, slots=True)
class Entry:
    """``kind`` "s": the command's start is due; "e": its window's end (``at_ms`` is the
    endAt it was set for, so a window that changed since is told apart)."""

    kind: str
    entity_id: str
    command_id: str
    at_ms: int
    #: When the entry is due (its score): ``at_ms``, or later for a start waiting out a cooldown.
    due_ms: int = field(default=0, compare=False)

    @property
    def due(self) -> int:
        return self.due_ms or self.at_ms

    @property
    def member(self) -> str:
        # The entity last: the only part that may hold any character.
        return f"{self.kind}|{self.command_id}|{self.at_ms}|{self.entity_id}"

    @classmethod
    def parse(cls, member: bytes | str, score: float = 0) -> Entry:
        text = member.decode() if isinstance(member, bytes) else member
        kind, command_id, at_ms, entity_id = text.split("|", 3)
        return cls(kind, entity_id, command_id, int(at_ms), int(score))


class Due:
    Entry = Entry

    def __init__(self, redis: aioredis.Redis, now: Callable[[], datetime] | None = None) -> None:
        self._redis = redis
        self._take = Script(redis, _TAKE)
        self._now = now

    async def add_many(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        pipe = self._redis.pipeline(transaction=False)
        for e in entries:
            pipe.zadd(_bucket_key(bucket_of(e.entity_id)), {e.member: e.at_ms})
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await pipe.execute()

    async def take(self, limit: int, lease_ms: int = LEASE_MS, lead_ms: int = 0) -> list[Entry]:
        """Lease up to ``limit`` entries of each bucket due within ``lead_ms``, earliest first."""
        now = int(self._now().timestamp() * 1000) if self._now else ""
        replies = await self._take.run_many([([_bucket_key(bucket)], [now, limit, lease_ms, lead_ms]) for bucket in range(BUCKETS)])
        taken = [Entry.parse(member, float(score)) for reply in replies for member, score in zip(reply[::2], reply[1::2], strict=True)]
        return sorted(taken, key=lambda e: e.due)

    async def settle(self, done: Sequence[Entry], later: Sequence[tuple[Entry, int]]) -> None:
        """Remove entries acted on; move those due again later (a start waiting for a cooldown)."""
        if not done and not later:
            return
        pipe = self._redis.pipeline(transaction=False)
        for e in done:
            pipe.zrem(_bucket_key(bucket_of(e.entity_id)), e.member)
        for e, at_ms in later:
            pipe.zadd(_bucket_key(bucket_of(e.entity_id)), {e.member: at_ms})
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await pipe.execute()
