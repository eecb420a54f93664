"""A subscription a backend keeps only as long as someone renews it (measurement reports, an
EV aggregator's webhook): made at start-up, made again every ``every_s`` (a backend that lost
it gets it back), and after a failure tried again sooner, backing off from one second."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

FIRST_RETRY_S = 1.0


async def keep_subscribed(
    subscribe: Callable[[], Awaitable[object]], failed: Callable[[Exception, float], None], *,
    every_s: float, running: Callable[[], bool] = lambda: True,
) -> None:
    """``subscribe`` now and every ``every_s`` while ``running()``; after a failure (told to
    ``failed`` with the seconds until the next try) again in 1 s, doubling up to ``every_s``."""
    delay = FIRST_RETRY_S
    while running():
        try:
            await subscribe()
        except Exception as exc:  # the backend, or a bug: either way, try again later
            failed(exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, every_s)
            continue
        delay = FIRST_RETRY_S
        await asyncio.sleep(every_s)
