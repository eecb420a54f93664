"""The ev-aggregator backend against the simulated aggregator, over real HTTP both ways: the
simulator's app and a stand-in for dispatch's server (the backend's webhook route) each under
uvicorn on a free port, in the test's event loop, with pending actions in a real Redis.

What dispatch would do with the answers is not here (see the e2e test): ``report`` records
what the backend learned."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from dercmd.dispatch import backends
from dercmd.dispatch.backends.ev_aggregator import CALLBACK_PATH, EvAggregatorBackend
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.launcher import free_port
from dercmd.protocols.ev_aggregator import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from dercmd.settings import Settings
from dercmd.simulator.app import create_app
from dercmd.simulator.backends.ev_aggregator import EvAggregatorSim

FLEET = """
entities:
  ev-3: {kind: EV, vendor: bmw, backend: ev-aggregator}
  ev-7: {kind: EV, vendor: bmw, backend: ev-aggregator, vendorDeviceId: WBA-0007}
  ev-1: {kind: EV, vendor: tesla, backend: vendor-cloud}
"""
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
WEBHOOK_SECRET = "test-webhook-secret"
TIMEOUT_S = 0.5
POLL_S = 0.3
CONFIRM_MS = 150


@dataclass
class Reports:
    """``context.report``: every result the backend learned, in order."""

    results: list[backends.DeviceResult] = field(default_factory=list)

    async def __call__(self, results: Sequence[backends.DeviceResult]) -> list[str]:
        self.results += results
        return ["emit"] * len(results)

    def of(self, command_id: str) -> list[tuple[bool, str | None]]:
        return [(r.succeeded, r.message) for r in self.results if r.command_id == command_id]


@dataclass
class Harness:
    backend: EvAggregatorBackend
    reports: Reports
    sim: EvAggregatorSim
    sim_http: httpx.AsyncClient
    fleet: Fleet
    context: backends.BackendContext
    webhook_url: str

    def delivery(self, entity_id: str = "ev-3", type: CommandType = CommandType.START_CHARGING,
                 command_id: str | None = None, entity: Entity | None = None) -> backends.Delivery:
        order = DispatchOrderV1(command_id=command_id or f"c-{uuid.uuid4().hex[:12]}", entity_id=entity_id, type=type,
                                fence=1, accepted_at=T0, ordered_at=T0)
        return backends.Delivery(order, entity or self.fleet.entities[entity_id], token="unused")

    async def send(self, delivery: backends.Delivery) -> backends.Accepted | backends.BackendError:
        """The answer, or the error of the call as a whole (what a one-command call not taken is)."""
        try:
            [answer] = await self.backend.send([delivery])
        except backends.BackendError as exc:
            return exc
        return answer

    async def faults(self, kind: str, **plan: Any) -> None:
        r = await self.sim_http.put("/sim/faults", json={"devices": ["ev-3"], "probability": 1, "kinds": [kind], **plan})
        assert r.status_code == 200, r.text

    async def received(self, entity_id: str = "ev-3") -> list[str]:
        r = await self.sim_http.get(f"/sim/devices/{entity_id}/received")
        return [c["commandId"] for c in r.json()["commands"]]

    async def eventually(self, probe: Any, what: str, deadline_s: float = 5.0) -> None:
        end = asyncio.get_running_loop().time() + deadline_s
        while not probe():
            assert asyncio.get_running_loop().time() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)


async def serve(app: FastAPI) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "server exited"
        await asyncio.sleep(0.01)
    return server, task, port


@pytest.fixture
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> AsyncIterator[Harness]:
    monkeypatch.setenv("DERCMD_EV_AGGREGATOR_URL", "")
    monkeypatch.setenv("DERCMD_EV_AGGREGATOR_CLIENT_ID", "test-client")
    monkeypatch.setenv("DERCMD_EV_AGGREGATOR_CLIENT_SECRET", "test-secret")
    monkeypatch.setenv("DERCMD_EV_AGGREGATOR_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("DERCMD_EV_AGGREGATOR_TIMEOUT_S", str(TIMEOUT_S))
    monkeypatch.setenv("DERCMD_EV_AGGREGATOR_POLL_INTERVAL_S", str(POLL_S))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(FLEET)
    fleet = Fleet.load(str(fleet_file))
    # The simulator serves its Modbus devices too: on a port of its own, beside any other run.
    sim_app = create_app(Settings(fleet_file=str(fleet_file), sim_confirm_delay_ms=CONFIRM_MS, sim_token_ttl_s=1,
                                  sim_modbus_port=free_port()))
    sim_server, sim_task, sim_port = await serve(sim_app)
    dispatch_app = FastAPI()
    dispatch_port = free_port()
    settings = Settings(fleet_file=str(fleet_file), bind_host="127.0.0.1", simulator_port=sim_port, dispatch_port=dispatch_port,
                        dispatch_callback_url="", deadline_sent_s=30)
    redis = aioredis.from_url(redis_url)
    reports = Reports()
    context = backends.BackendContext(
        settings=settings, fleet=fleet, redis=redis, callback_base_url=settings.callback_base_url,
        token=lambda e, c: "", entity_of=lambda t, c: None, report=reports,
    )
    backend = backends.create("ev-aggregator", context)
    assert isinstance(backend, EvAggregatorBackend)
    assert backend.router is not None
    dispatch_app.include_router(backend.router)
    dispatch_server = uvicorn.Server(uvicorn.Config(dispatch_app, host="127.0.0.1", port=dispatch_port, log_level="warning"))
    dispatch_task = asyncio.create_task(dispatch_server.serve())
    while not dispatch_server.started:
        await asyncio.sleep(0.01)
    sim: EvAggregatorSim = sim_app.state.ev_aggregator
    await backend.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim_port}", timeout=10) as sim_http:
        h = Harness(backend, reports, sim, sim_http, fleet, context, settings.callback_base_url + CALLBACK_PATH)
        await h.eventually(lambda: sim.webhook is not None, "the webhook subscription")
        yield h
    await backend.aclose()
    for server in (sim_server, dispatch_server):
        server.should_exit = True
    await asyncio.gather(sim_task, dispatch_task)
    await redis.aclose()


async def test_the_webhook_is_subscribed_with_the_secret_at_dispatchs_callback_url(harness: Harness) -> None:
    assert harness.sim.webhook is not None
    assert (harness.sim.webhook.url, harness.sim.webhook.secret) == (harness.webhook_url, WEBHOOK_SECRET)


@pytest.mark.parametrize(("type", "action"), [(CommandType.START_CHARGING, "START_CHARGING"), (CommandType.STOP_CHARGING, "STOP_CHARGING")])
async def test_each_type_is_one_action_confirmed_by_webhook(harness: Harness, type: CommandType, action: str) -> None:
    delivery = harness.delivery("ev-7", type)  # known to the aggregator by its vendorDeviceId
    answer = await harness.send(delivery)

    assert isinstance(answer, backends.Accepted), answer
    assert answer.confirmation is backends.Confirmation.ASYNC
    made = harness.sim.actions[answer.backend_ref or ""]
    assert (made.vehicle_id, made.type, made.idempotency_key) == ("WBA-0007", action, delivery.order.command_id)
    await harness.eventually(lambda: harness.reports.of(delivery.order.command_id), "the result")
    assert harness.reports.results == [backends.DeviceResult("ev-7", delivery.order.command_id, True, None)]
    assert await harness.received("ev-7") == [delivery.order.command_id]
    # The webhook took it out of polling: nothing is left to ask about.
    assert await harness.backend.pending.waiting() == 0


async def test_the_same_command_sent_again_is_the_same_action_never_a_second(harness: Harness) -> None:
    delivery = harness.delivery()
    first, again = await harness.send(delivery), await harness.send(delivery)
    assert isinstance(first, backends.Accepted) and isinstance(again, backends.Accepted)
    assert first.backend_ref == again.backend_ref
    assert await harness.received() == [delivery.order.command_id]
    assert len(harness.sim.actions) == 1


async def test_refusals(harness: Harness) -> None:
    ghost = Entity(kind=EntityKind.EV, vendor="bmw", backend="ev-aggregator", id="ev-ghost")
    unknown = await harness.send(harness.delivery("ev-ghost", entity=ghost))
    assert isinstance(unknown, backends.Refused) and "404" in unknown.detail, unknown

    await harness.sim_http.put("/sim/ev-aggregator/vehicles/ev-3", json={"pluggedIn": False})
    unplugged = await harness.send(harness.delivery())
    assert isinstance(unplugged, backends.Refused) and "409" in unplugged.detail, unplugged
    stop = await harness.send(harness.delivery(type=CommandType.STOP_CHARGING))  # stopping needs no cable
    assert isinstance(stop, backends.Accepted)
    assert len(await harness.received()) == 1


async def test_a_start_whose_vehicle_is_unplugged_before_it_is_carried_out_fails(harness: Harness) -> None:
    delivery = harness.delivery()
    assert isinstance(await harness.send(delivery), backends.Accepted)
    await harness.sim_http.put("/sim/ev-aggregator/vehicles/ev-3", json={"pluggedIn": False})
    await harness.eventually(lambda: harness.reports.of(delivery.order.command_id), "the result")
    assert harness.reports.of(delivery.order.command_id) == [(False, "vehicle unplugged")]
    [outcome] = await harness.backend.outcomes([backends.Query(harness.fleet.entities["ev-3"], delivery.order.command_id)])
    assert outcome == backends.CommandOutcome(backends.Finding.FAILED, "vehicle unplugged")


async def test_5xx_is_not_delivered_and_makes_nothing_then_the_same_command_goes_through(harness: Harness) -> None:
    await harness.faults("5xx")
    delivery = harness.delivery()
    answer = await harness.send(delivery)
    assert isinstance(answer, backends.NotDelivered), answer
    assert await harness.received() == []
    [outcome] = await harness.backend.outcomes([backends.Query(harness.fleet.entities["ev-3"], delivery.order.command_id)])
    assert outcome.finding is backends.Finding.UNKNOWN  # safe to send again

    await harness.sim_http.delete("/sim/faults")
    assert isinstance(await harness.send(delivery), backends.Accepted)
    assert await harness.received() == [delivery.order.command_id]


async def test_429_is_not_delivered_with_the_retry_after(harness: Harness) -> None:
    await harness.faults("429", retryAfterS=2.5)
    answer = await harness.send(harness.delivery())
    assert isinstance(answer, backends.NotDelivered) and answer.retry_after_s == 2.5, answer
    assert await harness.received() == []


async def test_latency_within_the_timeout_is_accepted(harness: Harness) -> None:
    await harness.faults("latency", latencyMs=200)
    delivery = harness.delivery()
    assert isinstance(await harness.send(delivery), backends.Accepted)
    assert await harness.received() == [delivery.order.command_id]


@pytest.mark.parametrize("kind", ["timeout_after_act", "drop_connection"])
async def test_an_answer_that_never_comes_is_unknown_and_the_action_is_found_by_its_key(harness: Harness, kind: str) -> None:
    await harness.faults(kind, hangS=2 * TIMEOUT_S)
    delivery = harness.delivery()
    started = asyncio.get_running_loop().time()
    answer = await harness.send(delivery)
    elapsed = asyncio.get_running_loop().time() - started

    assert isinstance(answer, backends.DeliveryUnknown), answer
    if kind == "drop_connection":
        assert elapsed < TIMEOUT_S  # the connection closed: no waiting for the timeout
    assert await harness.received() == [delivery.order.command_id]  # the vehicle has it
    # What dispatch asks of an unknown delivery: the action, found by the command id.
    await harness.eventually(lambda: bool(harness.reports.of(delivery.order.command_id)), "the action's result")
    [outcome] = await harness.backend.outcomes([backends.Query(harness.fleet.entities["ev-3"], delivery.order.command_id)])
    assert outcome.finding is backends.Finding.SUCCEEDED
    # Sent again with the same key (were dispatch ever to): the same action, not a second one.
    await harness.sim_http.delete("/sim/faults")
    assert isinstance(await harness.send(delivery), backends.Accepted)
    assert await harness.received() == [delivery.order.command_id]


async def test_a_lost_webhook_is_made_up_by_polling(harness: Harness) -> None:
    await harness.faults("lose_callback")
    delivery = harness.delivery()
    assert isinstance(await harness.send(delivery), backends.Accepted)
    await harness.eventually(lambda: harness.reports.of(delivery.order.command_id), "the polled result")
    assert harness.reports.of(delivery.order.command_id) == [(True, None)]
    await asyncio.sleep(3 * POLL_S)
    assert harness.reports.of(delivery.order.command_id) == [(True, None)]  # polled once it ended, then left alone
    assert await harness.backend.pending.waiting() == 0


async def test_two_replicas_poll_an_action_once_between_them(harness: Harness) -> None:
    other_reports = Reports()
    other = backends.create("ev-aggregator", backends.BackendContext(
        settings=harness.context.settings, fleet=harness.fleet, redis=harness.context.redis,
        callback_base_url=harness.context.callback_base_url, token=harness.context.token,
        entity_of=harness.context.entity_of, report=other_reports,
    ))
    assert isinstance(other, EvAggregatorBackend)
    await other.start()
    try:
        await harness.faults("lose_callback")
        deliveries = [harness.delivery(command_id=f"poll-{i}-{uuid.uuid4().hex[:6]}") for i in range(5)]
        for delivery in deliveries:
            assert isinstance(await harness.send(delivery), backends.Accepted)

        def every_one_reported() -> bool:
            return {r.command_id for r in harness.reports.results + other_reports.results} >= {d.order.command_id for d in deliveries}

        await harness.eventually(every_one_reported, "every result, polled by either replica")
        await asyncio.sleep(3 * POLL_S)
        reported = [r.command_id for r in harness.reports.results + other_reports.results]
        assert sorted(reported) == sorted(d.order.command_id for d in deliveries)  # each once
    finally:
        await other.aclose()


async def test_the_access_token_is_renewed_before_it_expires(harness: Harness) -> None:
    issued = harness.sim.tokens_issued  # the subscription's
    assert isinstance(await harness.send(harness.delivery()), backends.Accepted)
    await asyncio.sleep(1.1)  # the sim's tokens live 1 s
    assert isinstance(await harness.send(harness.delivery(type=CommandType.STOP_CHARGING)), backends.Accepted)
    assert harness.sim.tokens_issued == issued + 1


def signed(body: bytes, *, secret: str = WEBHOOK_SECRET, webhook_id: str | None = None, at: float | None = None) -> dict[str, str]:
    """The headers the aggregator sends with ``body``."""
    timestamp = int(time.time() if at is None else at)
    webhook_id = webhook_id or uuid.uuid4().hex
    return {ID_HEADER: webhook_id, TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, body, timestamp, webhook_id)}


async def test_a_webhook_is_taken_only_with_its_signature(harness: Harness) -> None:
    body = (b'{"event":"action.updated","action":{"id":"a1","vehicleId":"ev-3","type":"START_CHARGING",'
            b'"state":"CONFIRMED","idempotencyKey":"forged"}}')
    async with httpx.AsyncClient() as http:
        forged = await http.post(harness.webhook_url, content=body, headers=signed(body, secret="guessed"))
        unsigned = await http.post(harness.webhook_url, content=body)
        genuine = await http.post(harness.webhook_url, content=body, headers=signed(body))
        pending = body.replace(b"CONFIRMED", b"PENDING")
        ignored = await http.post(harness.webhook_url, content=pending, headers=signed(pending))
    assert forged.status_code == unsigned.status_code == 403
    assert genuine.status_code == 200 and genuine.json() == {"state": "emit"}
    assert ignored.status_code == 200 and ignored.json() == {"state": "ignored"}
    assert harness.reports.of("forged") == [(True, None)]


async def test_a_stale_or_replayed_webhook_changes_nothing(harness: Harness) -> None:
    """A genuine webhook captured and sent again: outside its window it is refused as stale,
    inside it recognised by its id and answered without being taken a second time."""
    body = (b'{"event":"action.updated","action":{"id":"a2","vehicleId":"ev-3","type":"START_CHARGING",'
            b'"state":"FAILED","failureReason":"unplugged","idempotencyKey":"replayed"}}')
    async with httpx.AsyncClient() as http:
        stale = await http.post(harness.webhook_url, content=body, headers=signed(body, at=time.time() - 3600))
        headers = signed(body)
        first = await http.post(harness.webhook_url, content=body, headers=headers)
        again = await http.post(harness.webhook_url, content=body, headers=headers)
    assert stale.status_code == 403 and stale.json()["key"] == "stale_webhook"
    assert first.status_code == 200 and first.json() == {"state": "emit"}
    assert again.status_code == 200 and again.json() == {"state": "replayed"}
    assert harness.reports.of("replayed") == [(False, "unplugged")]  # taken once


async def test_an_unknown_command_is_unknown(harness: Harness) -> None:
    [outcome] = await harness.backend.outcomes([backends.Query(harness.fleet.entities["ev-3"], "never-sent")])
    assert outcome.finding is backends.Finding.UNKNOWN


async def test_a_call_of_which_nothing_was_taken_fails_as_a_whole(harness: Harness) -> None:
    """So that dispatch's circuit breaker counts it and its shared 429 pause applies."""
    await harness.faults("429", retryAfterS=1.5)
    with pytest.raises(backends.NotDelivered) as caught:
        await harness.backend.send([harness.delivery()])
    assert caught.value.retry_after_s == 1.5
    await harness.faults("timeout_after_act", hangS=2 * TIMEOUT_S)
    with pytest.raises(backends.DeliveryUnknown):
        await harness.backend.send([harness.delivery()])
