"""dispatch's at-most-once delivery state, and its interplay with arbitration's slots, on a real Redis."""

from datetime import UTC, datetime

import redis.asyncio as aioredis

from dercmd.state import keys as redis_keys
from dercmd.arbitration.arbiter import Arbiter
from dercmd.state.delivery import Deliveries, Outcome, Stage, Step, Transition
from dercmd.events import CommandAcceptedV1, CommandStatus, CommandType
from dercmd.fleet import Fleet

OK = Outcome(CommandStatus.SUCCEEDED)
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FLEET = Fleet.model_validate({"entities": {"e": {"kind": "EV", "vendor": "t", "backend": "vendor-cloud", "cooldownS": 0}}})


def cmd(id: str, start: datetime | None = None) -> CommandAcceptedV1:
    return CommandAcceptedV1(id=id, entity_id="e", type=CommandType.START_CHARGING, trigger_time=start, accepted_at=T0, source="t")


async def test_claim_once_and_refuse_orders_older_than_the_active_command(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await client.hset(redis_keys.slots("e"), "active_fence", 3)
    assert (await d.claim("e", "old", 2)).step is Step.STALE
    assert (await d.claim("e", "c", 3)).step is Step.CLAIMED
    assert await d.claim("e", "c", 3) == Transition(Step.FOUND, Stage.INFLIGHT)  # a second claim never says "claimed"
    await client.hset(redis_keys.slots("e"), "active_fence", 9)
    assert await d.claim("e", "c", 3) == Transition(Step.FOUND, Stage.INFLIGHT)  # what was claimed resumes, whatever the fence
    await client.aclose()


async def test_a_result_before_sent_is_held_for_the_sender(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await d.claim("e", "c", 0)
    assert (await d.result("e", "c", OK)).step is Step.DEFERRED  # the callback beat the backend's answer
    assert await d.accepted("e", "c") == Transition(Step.FOUND, Stage.HELD, OK)
    await d.claim("e", "d", 0)
    assert await d.accepted("e", "d") == Transition(Step.ADVANCED, Stage.ACCEPTED)
    assert (await d.result("e", "d", OK)).step is Step.DEFERRED  # between the answer and Sent
    assert await d.sent("e", "d") == Transition(Step.FOUND, Stage.HELD, OK)
    await client.aclose()


async def test_a_result_after_sent_is_emitted_by_the_callback_and_repeats_say_done(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await d.claim("e", "c", 0)
    await d.accepted("e", "c")
    assert await d.sent("e", "c") == Transition(Step.ADVANCED, Stage.SENT)
    assert (await d.result("e", "c", OK)).step is Step.EMIT
    assert await d.result("e", "c", OK) == Transition(Step.FOUND, Stage.DONE, OK)
    assert await d.claim("e", "c", 0) == Transition(Step.FOUND, Stage.DONE, OK)
    await client.aclose()


async def test_arbitration_cancels_an_active_command_only_if_dispatch_has_not_claimed_it(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    arbiter, d = Arbiter(client, FLEET, 0, now=lambda: T0), Deliveries(client)
    first = await arbiter.decide(cmd("a"))
    assert (await d.claim("e", "a", first.fence)).step is Step.CLAIMED
    second = await arbiter.decide(cmd("b"))
    assert second.superseded == ()  # "a" is being delivered: its result is its terminal status
    third = await arbiter.decide(cmd("c"))
    assert third.superseded == ("b",)  # "b" was never claimed: Canceled, and its order is stale
    assert (await d.claim("e", "b", second.fence)).step is Step.STALE
    await client.aclose()


async def test_scheduling_does_not_invalidate_the_active_commands_order(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    arbiter, d = Arbiter(client, FLEET, 0, now=lambda: T0), Deliveries(client)
    active = await arbiter.decide(cmd("a"))
    scheduled = await arbiter.decide(cmd("s", start=datetime(2027, 1, 1, tzinfo=UTC)))
    assert scheduled.fence > active.fence
    assert (await d.claim("e", "a", active.fence)).step is Step.CLAIMED
    await client.aclose()


def test_outcome_encoding_round_trips() -> None:
    o = Outcome(CommandStatus.FAILED, "backend_refused", "HTTP 409 | device busy")
    assert Outcome.decode(o.encode()) == Outcome(CommandStatus.FAILED, "backend_refused", "HTTP 409 / device busy")


async def test_not_taken_restores_what_the_device_held_and_a_late_result_is_kept_for_the_next_claim(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    slots = redis_keys.slots("e")
    await d.claim("e", "w1", 0, window=True)  # the device holds window w1
    assert (await d.claim("e", "c2", 0)).step is Step.CLAIMED  # c2 replaces it on the device ...
    assert await client.hget(slots, "held") is None
    assert [t.step for t in await d.retry_many([(("e", "c2"), 0)])] == [Step.RETRY]  # ... had it got there
    assert (await client.hget(slots, "held"), await client.hget(slots, "delivered")) == (b"w1", None)
    assert (await d.result("e", "c2", OK)).step is Step.DEFERRED  # it had, after all: the next claim resumes from it
    assert await d.claim("e", "c2", 0) == Transition(Step.FOUND, Stage.HELD, OK)
    await client.aclose()


async def test_not_taken_while_a_newer_command_took_the_slot_is_superseded_and_a_late_one_is_abandoned(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    slots = redis_keys.slots("e")
    await d.claim("e", "c", 1)
    await client.hset(slots, "active_fence", 2)  # arbitration left it: it counted as delivered
    assert [t.step for t in await d.retry_many([(("e", "c"), 1)])] == [Step.SUPERSEDED]
    assert (await client.get(redis_keys.delivery("e", "c"))).startswith(b"done:Canceled|superseded")
    await d.claim("e", "w", 2, window=True)
    assert [t.step for t in await d.retry_many([(("e", "w"), 2)])] == [Step.RETRY]
    failed = Outcome(CommandStatus.FAILED, "backend_unavailable", "late")
    assert [t.step for t in await d.abandon_many([(("e", "w"), 2, failed)])] == [Step.ABANDONED]
    assert await d.claim("e", "w", 2) == Transition(Step.FOUND, Stage.DONE, failed)  # never sent after its Failed
    assert await client.hget(slots, "held") is None  # it never reached the device
    await client.aclose()


async def test_after_redis_lost_the_state_a_result_is_recorded_once_and_a_not_taken_command_may_be_claimed_again(
    redis_url: str,
) -> None:
    """Redis restarted empty while a command was out: the backend's result is the command's one
    terminal status (recorded, then repeated as done), and a retry finds nothing to hold back."""
    client = aioredis.from_url(redis_url)
    d = Deliveries(client)
    await d.claim("e", "c", 0)
    await d.claim("e", "n", 0)
    await client.flushdb()  # the restart
    assert await d.accepted("e", "c") == Transition(Step.FOUND, Stage.MISSING)  # the sender publishes Sent: the backend took it
    assert (await d.result("e", "c", OK)).step is Step.EMIT
    assert await d.result("e", "c", OK) == Transition(Step.FOUND, Stage.DONE, OK)
    assert await d.claim("e", "c", 0) == Transition(Step.FOUND, Stage.DONE, OK)  # never delivered again
    assert await d.retry_many([(("e", "n"), 0)]) == [Transition(Step.FOUND, Stage.MISSING)]  # not taken: claimed afresh
    assert (await d.claim("e", "n", 0)).step is Step.CLAIMED
    await client.aclose()
