"""Redis's clock, as seen from this host: the one clock every replica decides by.

arbitration's scripts read ``TIME`` in Redis; a service that must act at one of those times
(dispatch holding an order until its ``notBefore``) measures how far this host's clock is from
Redis's and corrects by that, so hosts a few seconds apart still act together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from .redis_keys import CALL_TIMEOUT_S

log = logging.getLogger(__name__)


class SharedClock:
    def __init__(self, redis: aioredis.Redis, every_s: float = 30.0) -> None:
        self._redis = redis
        self._every_s = every_s
        self.offset_s = 0.0  # Redis's clock minus this host's
        self._task: asyncio.Task[None] | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset_s, UTC)

    async def sync(self) -> None:
        """Measure the offset, halving the round trip (a few tenths of a ms off at most)."""
        before = time.time()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            seconds, micros = await self._redis.time()
        after = time.time()
        self.offset_s = seconds + micros / 1e6 - (before + after) / 2

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.create_task(self._keep(), name="clock")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.sync()
            except Exception as exc:  # keep the last offset; Redis being down shows elsewhere
                log.warning("clock sync failed", extra={"error": repr(exc)})
