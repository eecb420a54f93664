"""Webhooks already taken, so that a replayed one (the same id again, inside the window its
timestamp is accepted in) changes nothing.

Key: ``dercmd:{<backend>}:webhook:<id>`` (string "1", expires with the window): written and read
by dispatch's backend that receives the webhooks (today the EV aggregator's,
:class:`Webhooks`), after a webhook was taken. The backend's name is the hash tag: one
backend's webhooks share a Redis Cluster slot.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from .keys import CALL_TIMEOUT_S


class Webhooks:
    def __init__(self, redis: aioredis.Redis, backend: str) -> None:
        self._redis = redis
        self._prefix = f"dercmd:{{{backend}}}:webhook:"

    async def seen(self, webhook_id: str) -> bool:
        """Whether this webhook was taken before (and is still inside its window)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return bool(await self._redis.exists(self._prefix + webhook_id))

    async def taken(self, webhook_id: str, window_s: float) -> None:
        """Remember the webhook for ``window_s`` (a replay outside it is refused as stale)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._redis.set(self._prefix + webhook_id, "1", px=max(1, int(window_s * 1000)))
