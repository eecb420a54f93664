from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from dercmd.clock import SharedClock


async def test_the_shared_clock_is_redis_time(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    clock = SharedClock(client)
    await clock.sync()
    seconds, micros = await client.time()
    redis_now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    assert abs(clock.now() - redis_now) < timedelta(milliseconds=50)
    clock.offset_s += 5  # as on a host whose clock is 5 s behind Redis's: the clock corrects it
    assert abs(clock.now() - redis_now - timedelta(seconds=5)) < timedelta(milliseconds=50)
    await client.aclose()
