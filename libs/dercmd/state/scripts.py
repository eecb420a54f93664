"""Lua scripts run many at a time: one pipeline of ``EVALSHA`` calls, one round trip.

redis-py's registered scripts cost a second round trip per pipeline (it asks ``SCRIPT EXISTS``
before every ``execute``): on the hot path, where every batch is one pipeline, that doubled
the Redis waits. Here a pipeline is sent as it is; only when the server answers ``NOSCRIPT``
(a Redis restarted or flushed since the script was loaded) is the script loaded and the
pipeline sent again. That is safe: a script the server does not have ran for none of the
calls, and a pipeline carries calls of one script only.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from .keys import CALL_TIMEOUT_S


def source(name: str) -> str:
    """The text of ``name`` (e.g. ``"slots.lua"``), a script kept beside the module that runs it."""
    return resources.files(__package__).joinpath(name).read_text()


class Script:
    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self._redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run_many(self, calls: Sequence[tuple[Sequence[str], Sequence[object]]]) -> list[Any]:
        """One reply per ``(keys, args)``, in order; the calls run in that order. Raises the
        first error a call answered with (the others ran)."""
        if not calls:
            return []
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            async with asyncio.timeout(CALL_TIMEOUT_S):
                replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await self._redis.script_load(self.source)
                continue
            break
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)

    async def run(self, keys: Sequence[str], args: Sequence[object]) -> Any:
        return (await self.run_many([(keys, args)]))[0]
