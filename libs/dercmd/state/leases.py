"""Leases: one holder at a time for work any replica could do.

Key: ``dercmd:sweeper`` (string: the holder's id; expires unless the holder renews it).
Written and read by the status service's sweeper only (:class:`SweeperLease`).
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from .keys import CALL_TIMEOUT_S

_SWEEPER = "dercmd:sweeper"


class SweeperLease:
    """The status service's sweeper's lease, held as ``holder`` (a replica's own id)."""

    def __init__(self, redis: aioredis.Redis, holder: str) -> None:
        self._redis = redis
        self._holder = holder

    async def hold(self, ttl_ms: int) -> bool:
        """Take the lease for ``ttl_ms``, or renew it if this holder has it; False if another does."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            if await self._redis.set(_SWEEPER, self._holder, nx=True, px=ttl_ms):
                return True
            if (await self._redis.get(_SWEEPER)) == self._holder.encode():
                await self._redis.pexpire(_SWEEPER, ttl_ms)
                return True
        return False
