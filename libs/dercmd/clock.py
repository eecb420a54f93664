"""Redis's clock, as seen from this host: the one clock every replica decides by.

arbitration's scripts read ``TIME`` in Redis; a service that must act at one of those times
(dispatch holding an order until its ``notBefore``) measures how far this host's clock is from
Redis's and corrects by that, so hosts a few seconds apart still act together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from .state.keys import CALL_TIMEOUT_S
from .service import cancel_all

log = logging.getLogger(__name__)


class SharedClock:
    def __init__(self, redis: aioredis.Redis, every_s: float = 30.0) -> None:
        self._redis = redis
        self._every_s = every_s
        self.offset_s = 0.0  # Redis's clock minus this host's
        self.uncertainty_s = 0.0  # how far off offset_s may be
        self._task: asyncio.Task[None] | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset_s, UTC)

    def seconds_until(self, when: datetime) -> float:
        """How long to wait so as not to be early for ``when`` by Redis's clock, however far
        off the offset is."""
        return max(0.0, (when - self.now()).total_seconds() + self.uncertainty_s)

    async def sync(self, samples: int = 5) -> None:
        """Measure the offset: of a few round trips, the quickest (the least time for this
        event loop to have been busy on either side of it), halving it. The offset is known
        to within half that round trip, ``uncertainty_s``; one smaller than that is taken as
        none (hosts within a millisecond of each other, or one host)."""
        best: tuple[float, float] | None = None
        for _ in range(samples):
            before = time.time()
            async with asyncio.timeout(CALL_TIMEOUT_S):
                seconds, micros = await self._redis.time()
            after = time.time()
            sample = (after - before, seconds + micros / 1e6 - (before + after) / 2)
            if best is None or sample[0] < best[0]:
                best = sample
        assert best is not None
        rtt, offset = best
        self.uncertainty_s = rtt / 2
        self.offset_s = offset if abs(offset) > self.uncertainty_s else 0.0

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.create_task(self._keep(), name="clock")

    async def stop(self) -> None:
        await cancel_all(self._task)

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.sync()
            except Exception as exc:  # keep the last offset; Redis being down shows elsewhere
                log.warning("clock sync failed", extra={"error": repr(exc)})
