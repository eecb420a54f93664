"""The conformance suite every device backend passes against its simulator: each supported type
reaches the device once and succeeds, each injected fault gives the outcome dispatch relies on
(not delivered, refused, unknown and then resolved by asking), and a retry policy like
dispatch's never delivers a command twice.

A backend's suite is a subclass, ``Test<Backend>Conformance(BackendConformance)``, whose
``world`` fixture starts the backend's simulator for real (in this process, over real sockets)
and the backend against it, and says which commands to try (:class:`World`). The simulator's
fault plans are the ones ``PUT /sim/faults`` sets (:mod:`dercmd.simulator.faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
import uvicorn
from fastapi import FastAPI

from dercmd.dispatch import backends
from dercmd.dispatch.tokens import ResultTokens
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Entity, Fleet
from dercmd.launcher import free_port
from dercmd.settings import Settings
from dercmd.simulator.faults import FaultKind, FaultPlan, Faults

SECRET = "conformance-secret"


@contextlib.asynccontextmanager
async def served(app: FastAPI, port: int | None = None) -> AsyncIterator[str]:
    """``app`` served by uvicorn on this loop, on a free loopback port: its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + 10
    while not server.started:
        if task.done():
            task.result()
        assert asyncio.get_running_loop().time() < deadline, "server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class Results:
    """What the backend reports asynchronously (``BackendContext.report``), by command."""

    def __init__(self) -> None:
        self.by_command: dict[str, list[backends.DeviceResult]] = {}
        self._changed = asyncio.Event()

    async def report(self, results: Sequence[backends.DeviceResult]) -> list[str]:
        for result in results:
            self.by_command.setdefault(result.command_id, []).append(result)
        self._changed.set()
        return ["emit"] * len(results)

    async def wait_for(self, command_id: str, deadline_s: float = 10) -> backends.DeviceResult:
        async with asyncio.timeout(deadline_s):
            while command_id not in self.by_command:
                self._changed.clear()
                await self._changed.wait()
        return self.by_command[command_id][0]


def recorded(sim: FastAPI) -> Callable[[str], Awaitable[list[str]]]:
    """``World.received`` for a simulator app running in this process: its recorder's receipts."""

    async def received(entity_id: str) -> list[str]:
        return [r.command_id for r in sim.state.recorder.received(entity_id)]

    return received


def context(settings: Settings, fleet: Fleet, redis: Any, callback_base_url: str, results: Results) -> backends.BackendContext:
    """What dispatch would offer the backend, with results going to ``results``."""
    tokens = ResultTokens(SECRET)
    return backends.BackendContext(settings=settings, fleet=fleet, redis=redis, callback_base_url=callback_base_url,
                                   token=tokens.token, entity_of=tokens.entity_of, report=results.report)


@dataclass(frozen=True)
class Case:
    """One command to try: ``type`` on ``entity`` with ``value`` / ``percentage``."""

    entity: Entity
    type: CommandType
    value: int | None = None
    percentage: int | None = None


@dataclass
class World:
    """A backend running against its simulator.

    ``cases``: every type the backend supports, each on an entity of the simulator's;
    ``faulty``: the entity the fault tests use (with a command it supports); ``stranger``: an
    entity the simulator does not know (same backend); ``received(entity_id)``: the command
    ids the simulated device received, in order, each delivery an entry; ``faults``: the
    simulator's fault plans. The backend's timeout must be short (about 1 s) and the plans'
    ``hang_s`` longer than it."""

    backend: backends.DeviceBackend
    faults: Faults
    results: Results
    cases: list[Case]
    faulty: Case
    stranger: Entity
    received: Callable[[str], Awaitable[list[str]]]
    hang_s: float = 3.0
    extra: dict[str, Any] = field(default_factory=dict)


def delivery(case: Case, command_id: str | None = None) -> backends.Delivery:
    now = datetime.now(UTC)
    command_id = command_id or f"conf-{uuid.uuid4().hex[:12]}"
    order = DispatchOrderV1(command_id=command_id, entity_id=case.entity.id, type=case.type, value=case.value,
                            percentage=case.percentage, fence=1, accepted_at=now, ordered_at=now)
    return backends.Delivery(order, case.entity, ResultTokens(SECRET).token(case.entity.id, command_id))


async def send_one(world: World, d: backends.Delivery) -> backends.Accepted | backends.BackendError:
    try:
        [answer] = await world.backend.send([d])
    except backends.BackendError as exc:
        return exc
    return answer


async def ask(world: World, d: backends.Delivery) -> backends.CommandOutcome:
    assert isinstance(world.backend, backends.OutcomeQueries), f"{world.backend.name} cannot say what became of a command"
    [outcome] = await world.backend.outcomes([backends.Query(d.entity, d.order.command_id, d.order)])
    return outcome


async def settled(world: World, d: backends.Delivery, answer: backends.Accepted) -> None:
    """An accepted command ends succeeded: at once (SYNC) or by its reported result (ASYNC)."""
    if answer.confirmation is backends.Confirmation.ASYNC:
        result = await world.results.wait_for(d.order.command_id)
        assert result.succeeded, result
        assert result.entity_id == d.entity.id


def plan(world: World, kind: FaultKind, **extra: Any) -> None:
    world.faults.clear()
    world.faults.put(FaultPlan(devices=[world.faulty.entity.id], probability=1, kinds=[kind], latency_ms=300,
                               retry_after_s=2, hang_s=world.hang_s, **extra))


class BackendConformance:
    """Subclasses provide the ``world`` fixture."""

    #: Whether the protocol can say how long to wait after being rate limited.
    says_when_to_retry: ClassVar[bool] = True

    @pytest.fixture
    async def world(self) -> AsyncIterator[World]:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError
        yield  # type: ignore[unreachable]

    async def test_every_supported_type_reaches_the_device_once_and_succeeds(self, world: World) -> None:
        assert {c.type for c in world.cases} == set(world.backend.supported_types)
        for case in world.cases:
            d = delivery(case)
            answer = await send_one(world, d)
            assert isinstance(answer, backends.Accepted), (case, answer)
            await settled(world, d, answer)
            assert (await world.received(case.entity.id)).count(d.order.command_id) == 1

    async def test_a_device_it_does_not_know_is_refused(self, world: World) -> None:
        d = delivery(Case(world.stranger, world.faulty.type, world.faulty.value, world.faulty.percentage))
        answer = await send_one(world, d)
        assert isinstance(answer, backends.Refused), answer

    async def test_a_server_error_is_not_delivered_and_the_next_attempt_delivers_once(self, world: World) -> None:
        plan(world, FaultKind.ERROR_5XX)
        d = delivery(world.faulty)
        answer = await send_one(world, d)
        assert isinstance(answer, backends.NotDelivered), answer
        assert d.order.command_id not in await world.received(world.faulty.entity.id)
        world.faults.clear()
        again = await send_one(world, d)
        assert isinstance(again, backends.Accepted), again
        await settled(world, d, again)
        assert (await world.received(world.faulty.entity.id)).count(d.order.command_id) == 1

    async def test_rate_limited_is_not_delivered(self, world: World) -> None:
        plan(world, FaultKind.RATE_LIMITED)
        d = delivery(world.faulty)
        answer = await send_one(world, d)
        assert isinstance(answer, backends.NotDelivered), answer
        if self.says_when_to_retry:
            assert answer.retry_after_s == 2
        assert d.order.command_id not in await world.received(world.faulty.entity.id)

    @pytest.mark.parametrize("kind", [FaultKind.TIMEOUT_AFTER_ACT, FaultKind.DROP_CONNECTION])
    async def test_no_answer_after_the_device_acted_is_unknown_and_asking_finds_it_delivered(
        self, world: World, kind: FaultKind
    ) -> None:
        plan(world, kind)
        d = delivery(world.faulty)
        answer = await send_one(world, d)
        assert isinstance(answer, backends.DeliveryUnknown), answer
        world.faults.clear()
        outcome = await ask(world, d)
        assert outcome.finding in (backends.Finding.SUCCEEDED, backends.Finding.PENDING), outcome
        assert (await world.received(world.faulty.entity.id)).count(d.order.command_id) == 1

    async def test_a_late_answer_within_the_timeout_is_just_late(self, world: World) -> None:
        plan(world, FaultKind.LATENCY)
        d = delivery(world.faulty)
        answer = await send_one(world, d)
        assert isinstance(answer, backends.Accepted), answer
        world.faults.clear()
        await settled(world, d, answer)

    async def test_a_lost_result_is_found_by_asking(self, world: World) -> None:
        plan(world, FaultKind.LOSE_CALLBACK)
        d = delivery(world.faulty)
        answer = await send_one(world, d)
        assert isinstance(answer, backends.Accepted), answer
        world.faults.clear()
        if answer.confirmation is backends.Confirmation.SYNC:
            return  # the answer was the result: there is nothing to lose
        async with asyncio.timeout(10):
            while (outcome := await ask(world, d)).finding is backends.Finding.PENDING:
                await asyncio.sleep(0.1)
        assert outcome.finding is backends.Finding.SUCCEEDED, outcome
        assert d.order.command_id not in world.results.by_command

    async def test_a_command_never_sent_is_unknown_to_the_backend(self, world: World) -> None:
        outcome = await ask(world, delivery(world.faulty))
        assert outcome.finding is backends.Finding.UNKNOWN, outcome

    async def test_retrying_as_dispatch_does_never_delivers_twice(self, world: World) -> None:
        """Every fault on half the calls: resend only what was not delivered, ask about what
        is unknown (and resend only what the backend never got); every command ends
        delivered exactly once."""
        world.faults.clear()
        world.faults.put(FaultPlan(devices=[world.faulty.entity.id], probability=0.5, latency_ms=100,
                                   retry_after_s=0, hang_s=world.hang_s))
        commands = [delivery(world.faulty) for _ in range(12)]
        for d in commands:
            for _attempt in range(20):
                answer = await send_one(world, d)
                if isinstance(answer, backends.DeliveryUnknown):
                    outcome = await ask(world, d)
                    if outcome.finding is not backends.Finding.UNKNOWN:
                        break
                elif not isinstance(answer, backends.NotDelivered):
                    assert isinstance(answer, backends.Accepted), answer
                    break
            else:
                pytest.fail(f"{d.order.command_id} not delivered in 20 attempts")
        world.faults.clear()
        received = await world.received(world.faulty.entity.id)
        assert [received.count(d.order.command_id) for d in commands] == [1] * len(commands)
