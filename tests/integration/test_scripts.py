"""Scripts run by EVALSHA in one pipeline, loaded again when Redis lost them."""

from __future__ import annotations

import redis.asyncio as aioredis
import pytest
from redis.exceptions import ResponseError

from dercmd.state.scripts import Script

SOURCE = "redis.call('INCR', KEYS[1]); return redis.call('GET', KEYS[1]) .. ':' .. ARGV[1]"


async def test_runs_in_order_and_survives_a_script_flush(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    script = Script(client, SOURCE)
    assert await script.run_many([(["k"], ["a"]), (["k"], ["b"])]) == [b"1:a", b"2:b"]  # never loaded before
    await client.script_flush()  # as after a Redis restart
    assert await script.run_many([(["k"], ["c"])]) == [b"3:c"]  # loaded again, ran once
    assert await script.run_many([]) == []
    await client.aclose()


async def test_an_error_of_one_call_is_raised(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    failing = Script(client, "return redis.error_reply('nope ' .. ARGV[1])")
    with pytest.raises(ResponseError, match="nope x"):
        await failing.run_many([([], ["x"])])
    await client.aclose()
