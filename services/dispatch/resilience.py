"""What keeps dispatch from hammering a backend that cannot take more, and brings a command that
was not delivered back for another attempt:

- :class:`RateLimiter`: a token bucket per backend in Redis (:mod:`dercmd.state.rates`), so
  the rate holds over every dispatch replica, and a pause every replica honours once a backend
  answered 429 with ``Retry-After``.
- :class:`CircuitBreaker`: per backend and replica; after ``failures`` calls in a row that
  failed as a whole it opens (no calls for ``open_s``), then lets one trial call through
  (half-open), and closes on its success. Its state is a metric.
- :class:`RetryPolicy`: exponential backoff with full jitter, never past a command's deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timedelta
from enum import IntEnum

import redis.asyncio as aioredis

from dercmd.events import DispatchOrderV1
from dercmd.state.rates import RateBucket

from . import metrics

#: Without a rate, how long a replica goes by the last look at the shared pause before it looks
#: again: the hot path pays no Redis round trip per call, and another replica's 429 holds here
#: within this.
UNLIMITED_RECHECK_S = 0.1


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, backend: str, rate_per_s: float, burst: int) -> None:
        self._bucket = RateBucket(redis, backend, rate_per_s, burst)
        self._backend = backend
        self._rate = rate_per_s
        self._clear_until = 0.0  # unlimited: no pause known until then (monotonic)

    async def acquire(self) -> None:
        """Wait until a call to the backend may go."""
        if self._rate <= 0 and time.monotonic() < self._clear_until:
            return
        while (wait_ms := await self._bucket.take()) > 0:
            metrics.RATE_LIMITED_SECONDS.labels(self._backend).inc(wait_ms / 1000)
            await asyncio.sleep(wait_ms / 1000)
        self._clear_until = time.monotonic() + UNLIMITED_RECHECK_S

    async def pause(self, seconds: float) -> None:
        """The backend asked every caller to wait (429 ``Retry-After``)."""
        self._clear_until = 0.0
        await self._bucket.pause(int(seconds * 1000))


class Circuit(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, backend: str, failures: int, open_s: float) -> None:
        self._backend = backend
        self._threshold = failures
        self._open_s = open_s
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False  # a half-open trial call is out
        self._trial_at = 0.0
        self.state = Circuit.CLOSED
        metrics.CIRCUIT_STATE.labels(backend).set(0)

    def _set(self, state: Circuit) -> None:
        if state is not self.state:
            metrics.CIRCUIT_TRANSITIONS.labels(self._backend, state.name.lower()).inc()
        self.state = state
        metrics.CIRCUIT_STATE.labels(self._backend).set(int(state))

    def allow(self) -> bool:
        """Whether a call may go now (an open circuit lets one trial through after ``open_s``)."""
        now = time.monotonic()
        if self.state is Circuit.OPEN and now - self._opened_at >= self._open_s:
            self._set(Circuit.HALF_OPEN)
            self._trial = False
        if self.state is Circuit.HALF_OPEN:
            # One trial at a time; a trial that never got to call (its orders were stale, or
            # it was cancelled) records nothing, so after ``open_s`` another may go.
            if self._trial and now - self._trial_at < self._open_s:
                return False
            self._trial, self._trial_at = True, now
            return True
        return self.state is Circuit.CLOSED

    def reopens_in(self) -> float:
        return max(0.0, self._open_s - (time.monotonic() - self._opened_at)) if self.state is Circuit.OPEN else 0.0

    def record(self, ok: bool) -> None:
        """A call's fate: it reached the backend (``ok``, whatever the devices said) or failed as
        a whole (no connection, 5xx, no answer)."""
        if ok:
            self._failures = 0
            self._trial = False
            self._set(Circuit.CLOSED)
            return
        self._failures += 1
        if self.state is Circuit.HALF_OPEN or self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            self._trial = False
            self._set(Circuit.OPEN)


class RetryPolicy:
    def __init__(self, retry_for_s: float, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._retry_for = timedelta(seconds=retry_for_s)
        self._base_s = base_s
        self._max_s = max_s
        self._random = rng or random.Random()

    def deadline(self, order: DispatchOrderV1) -> datetime:
        """The last moment to try delivering: ``retry_for_s`` after it was due, and never after
        its window's end or the caller's ``expiresAt``."""
        deadline = (order.not_before or order.ordered_at) + self._retry_for
        return min(t for t in (deadline, order.end_at, order.expires_at) if t is not None)

    def backoff_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Wait before attempt ``attempt + 1``: full jitter over an exponential ceiling, at least
        what the backend asked for."""
        ceiling = min(self._max_s, self._base_s * 2**attempt)
        return max(retry_after_s or 0.0, self._random.uniform(0, ceiling))
