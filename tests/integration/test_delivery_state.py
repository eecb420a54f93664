"""dispatch's at-most-once delivery state on a real Redis."""

import redis.asyncio as aioredis

from dercmd import redis_keys
from dercmd.dispatch.delivery import Deliveries, Outcome
from dercmd.events import CommandStatus

OK = Outcome(CommandStatus.SUCCEEDED)


async def test_claim_once_and_refuse_stale_fences(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await client.hset(redis_keys.slots("e"), "fence", 3)
    assert await d.claim("e", "old", 2) == "stale"
    assert await d.claim("e", "c", 3) == "claimed"
    assert await d.claim("e", "c", 3) == "inflight"  # a second claim never says "claimed"
    await client.aclose()


async def test_a_result_before_sent_is_deferred_to_the_sender(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await d.claim("e", "c", 0)
    assert await d.result("e", "c", OK) == "deferred"
    assert Outcome.decode((await d.sent("e", "c")).removeprefix("result:")) == OK
    await client.aclose()


async def test_a_result_after_sent_is_emitted_by_the_callback(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await d.claim("e", "c", 0)
    assert await d.sent("e", "c") == "sent"
    assert await d.result("e", "c", OK) == "emit"
    assert await d.result("e", "c", OK) == "done:Succeeded||"  # a repeated callback emits nothing
    assert await d.claim("e", "c", 0) == "done:Succeeded||"
    await client.aclose()


def test_outcome_encoding_round_trips() -> None:
    o = Outcome(CommandStatus.FAILED, "backend_refused", "HTTP 409 | device busy")
    assert Outcome.decode(o.encode()) == Outcome(CommandStatus.FAILED, "backend_refused", "HTTP 409 / device busy")
