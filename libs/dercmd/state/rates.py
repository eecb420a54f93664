"""Rate limits per backend, shared by every dispatch replica (``rate_bucket.lua``).

Key: ``dercmd:rate:{backend}`` (hash; expires a minute after its last use, or after a pause)
    ============ =============================================== ================
    field        what                                            written/read by
    ============ =============================================== ================
    tokens       tokens left in the bucket (a float)             rate_bucket.lua
    at           when ``tokens`` was computed, ms (Redis clock)  rate_bucket.lua
    paused_until no call before this, ms: the backend answered   rate_bucket.lua
                 429 with ``Retry-After``
    ============ =============================================== ================

Written and read by dispatch only (:class:`dercmd.dispatch.resilience.RateLimiter`, which
keeps the policy: when to ask, how long to sleep). Circuit breakers keep no Redis state: they
are per replica.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from .scripts import Script, source

_SCRIPT = source("rate_bucket.lua")


def _bucket_key(backend: str) -> str:
    return f"dercmd:rate:{{{backend}}}"


class RateBucket:
    """One backend's bucket: ``rate_per_s`` tokens a second up to ``burst`` (a rate of 0 or
    less: no limit, only the shared pause)."""

    def __init__(self, redis: aioredis.Redis, backend: str, rate_per_s: float, burst: int) -> None:
        self._script = Script(redis, _SCRIPT)
        self._key = _bucket_key(backend)
        self._rate = rate_per_s
        self._burst = burst

    async def take(self) -> int:
        """Take a token: 0 when the call may go now, else the ms to wait before asking again."""
        return int((await self._script.run_many([([self._key], ("take", self._rate, self._burst))]))[0])

    async def pause(self, ms: int) -> None:
        """No call from any replica for ``ms`` (a later pause already set stays)."""
        await self._script.run_many([([self._key], ("pause", self._rate, self._burst, ms))])
