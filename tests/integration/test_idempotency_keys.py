"""Idempotency keys in Redis (dercmd.state.idempotency), on a real server: one request per
key and caller, its answer kept for replay, another request refused, a key freed after an
error or a lease that ran out, and two callers' keys apart."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from dercmd.state.idempotency import Answer, IdempotencyKeys, Outcome

CREATED = Answer(201, b'{"id": "c-1"}', {"location": "/v1/commands/c-1"})


async def test_a_key_is_taken_once_answered_once_and_replayed(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    keys = IdempotencyKeys(client, ttl_s=86400)
    first = await keys.begin("caller-a", "k1", "fp-1")
    assert first.outcome is Outcome.NEW and first.owner
    assert (await keys.begin("caller-a", "k1", "fp-1")).outcome is Outcome.IN_PROGRESS
    assert (await keys.begin("caller-a", "k1", "fp-2")).outcome is Outcome.MISMATCH
    assert await keys.finish("caller-a", "k1", "fp-1", first.owner, CREATED)
    again = await keys.begin("caller-a", "k1", "fp-1")
    assert (again.outcome, again.answer) == (Outcome.DONE, CREATED)
    assert (await keys.begin("caller-a", "k1", "fp-2")).outcome is Outcome.MISMATCH
    # Kept for the TTL (a day), not the in-progress lease.
    (name,) = [k async for k in client.scan_iter()]
    assert 86_000 < await client.ttl(name) <= 86_400
    # Another caller's same key is its own.
    assert (await keys.begin("caller-b", "k1", "fp-2")).outcome is Outcome.NEW
    await client.aclose()


async def test_an_error_frees_the_key_and_only_the_holder_may_finish_or_free_it(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    keys = IdempotencyKeys(client, ttl_s=60)
    first = await keys.begin("c", "k", "fp")
    assert not await keys.release("c", "k", "fp", "someone-else")
    assert not await keys.finish("c", "k", "fp", "someone-else", CREATED)
    assert await keys.release("c", "k", "fp", first.owner)
    second = await keys.begin("c", "k", "fp-other")  # free again, for any request
    assert second.outcome is Outcome.NEW
    assert await keys.finish("c", "k", "fp-other", second.owner, CREATED)
    assert not await keys.release("c", "k", "fp-other", second.owner)  # an answer kept stays kept
    assert (await keys.begin("c", "k", "fp-other")).outcome is Outcome.DONE
    await client.aclose()


async def test_a_lease_that_ran_out_frees_the_key_and_the_late_answer_is_not_kept(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    keys = IdempotencyKeys(client, ttl_s=60, lease_ms=100)
    stale = await keys.begin("c", "k", "fp")
    await asyncio.sleep(0.25)  # the replica answering it died, or took too long
    fresh = await keys.begin("c", "k", "fp")
    assert fresh.outcome is Outcome.NEW
    assert not await keys.finish("c", "k", "fp", stale.owner, Answer(201, b"{}"))
    assert await keys.finish("c", "k", "fp", fresh.owner, CREATED)
    assert (await keys.begin("c", "k", "fp")).answer == CREATED
    await client.aclose()
