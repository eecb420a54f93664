"""The circuit breaker's states and the retry policy's backoff and deadline (pure logic)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from dercmd.dispatch.resilience import Circuit, CircuitBreaker, RetryPolicy
from dercmd.events import CommandType, DispatchOrderV1


def test_the_circuit_opens_after_failures_in_a_row_lets_one_trial_through_and_closes_on_its_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("dercmd.dispatch.resilience.time.monotonic", lambda: clock[0])
    breaker = CircuitBreaker("test-breaker", failures=3, open_s=10)
    for _ in range(2):
        breaker.record(False)
    breaker.record(True)  # a success in between: the count starts again
    for _ in range(2):
        breaker.record(False)
    assert breaker.allow() and breaker.state is Circuit.CLOSED
    breaker.record(False)
    assert breaker.state is Circuit.OPEN and not breaker.allow() and breaker.reopens_in() == 10
    clock[0] += 10
    assert breaker.allow() and breaker.state is Circuit.HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.record(False)  # the trial failed: open again, for another while
    assert breaker.state is Circuit.OPEN and not breaker.allow()
    clock[0] += 10
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is Circuit.CLOSED and breaker.allow() and breaker.allow()


def test_a_half_open_trial_that_never_called_does_not_keep_the_circuit_shut(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("dercmd.dispatch.resilience.time.monotonic", lambda: clock[0])
    breaker = CircuitBreaker("test-breaker-trial", failures=1, open_s=10)
    breaker.record(False)
    clock[0] += 10
    assert breaker.allow()  # the trial; it is cancelled before it calls, and records nothing
    assert not breaker.allow()
    clock[0] += 10
    assert breaker.allow()  # another trial may go


def test_backoff_grows_with_full_jitter_within_its_ceiling_and_honours_retry_after() -> None:
    policy = RetryPolicy(30, base_s=0.2, max_s=5, rng=random.Random(7))
    for attempt, ceiling in [(0, 0.2), (1, 0.4), (3, 1.6), (10, 5.0)]:
        waits = [policy.backoff_s(attempt) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= ceiling and max(waits) > ceiling / 2
    assert policy.backoff_s(0, retry_after_s=3) == 3


def test_the_deadline_runs_from_when_it_was_due_and_never_past_a_windows_end() -> None:
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    order = DispatchOrderV1(command_id="c", entity_id="e", type=CommandType.STOP_FEED_IN, fence=1, accepted_at=t0, ordered_at=t0)
    policy = RetryPolicy(30, base_s=0.2, max_s=5)
    assert policy.deadline(order) == t0 + timedelta(seconds=30)
    held = order.model_copy(update={"not_before": t0 + timedelta(seconds=5)})
    assert policy.deadline(held) == t0 + timedelta(seconds=35)
    window = order.model_copy(update={"end_at": t0 + timedelta(seconds=10)})
    assert policy.deadline(window) == t0 + timedelta(seconds=10)
