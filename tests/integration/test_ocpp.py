"""OCPP 1.6J end to end in one process, over real WebSockets and HTTP: the gateway (served by
uvicorn), simulated charge points connected to it, and dispatch's ``ocpp`` backend calling the
gateway, whose results reach the backend's callback route. Each command type to its result,
each fault kind to its outcome class, and every command the charge points acted on recorded
once."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from dercmd.dispatch import backends
from dercmd.dispatch.backends.ocpp import CALLBACK_PATH, OcppBackend, OcppSettings
from dercmd.dispatch.tokens import ResultTokens
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.launcher import free_port
from dercmd.ocpp_gateway.app import add_routes
from dercmd.ocpp_gateway.gateway import Gateway
from dercmd.protocols.ocpp import SUBPROTOCOL, basic_authorization, hash_password
from dercmd.settings import Settings
from dercmd.simulator.faults import FaultKind, FaultPlan, Faults
from dercmd.simulator.backends.ocpp import OcppChargePoints, SimChargePoint
from dercmd.simulator.recorder import Recorder
from dercmd.state.ocpp import CommandState, OcppState
from dercmd.state.testing import set_ocpp_command, set_ocpp_link, set_ocpp_seen

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DISPATCH = "http://dispatch.test"
CALL_TIMEOUT_S = 1.0
CHARGE_POINTS = [f"cp-{i}" for i in range(1, 10)]
LOCKED_PASSWORD = "cp-locked-authorization-key-0123"

FLEET = Fleet.model_validate({"entities": {
    **{cp: {"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": ["StartCharging", "StopCharging"]}
       for cp in CHARGE_POINTS},
    # Declares the types in the fleet file, but its charge point declares no feature profile.
    "cp-mute": {"kind": "CP", "vendor": "abb", "backend": "ocpp", "declaredTypes": ["StartCharging", "StopCharging"]},
    # Never connects.
    "cp-offline": {"kind": "CP", "vendor": "abb", "backend": "ocpp", "vendorDeviceId": "OFF-1"},
    # Security profile 1: connects with HTTP Basic and its password.
    "cp-locked": {"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": ["StartCharging", "StopCharging"],
                  "ocppPasswordHash": hash_password(LOCKED_PASSWORD)},
}})


@dataclass
class Rig:
    backend: OcppBackend
    gateway: Gateway
    sim: OcppChargePoints
    recorder: Recorder
    faults: Faults
    redis: aioredis.Redis
    reported: list[backends.DeviceResult] = field(default_factory=list)
    tokens: ResultTokens = field(default_factory=lambda: ResultTokens("test-secret"))
    dispatch: FastAPI = field(default_factory=FastAPI)

    def delivery(self, entity_id: str, type: CommandType, command_id: str | None = None) -> backends.Delivery:
        command_id = command_id or f"{type.value[:5].lower()}-{uuid.uuid4().hex[:16]}"
        order = DispatchOrderV1(command_id=command_id, entity_id=entity_id, type=type, fence=1, accepted_at=T0, ordered_at=T0)
        return backends.Delivery(order, FLEET.entities[entity_id], self.tokens.token(entity_id, command_id))

    async def send(self, *deliveries: backends.Delivery) -> list[backends.Accepted | backends.BackendError]:
        return await self.backend.send(deliveries)

    async def result_of(self, command_id: str, deadline_s: float = 5.0) -> backends.DeviceResult:
        await until(lambda: any(r.command_id == command_id for r in self.reported), deadline_s)
        return next(r for r in self.reported if r.command_id == command_id)

    async def finding(self, delivery: backends.Delivery) -> backends.Finding:
        [outcome] = await self.backend.outcomes([backends.Query(delivery.entity, delivery.order.command_id, delivery.order)])
        return outcome.finding

    def received(self, entity_id: str) -> list[tuple[str, str]]:
        return [(r.command_id, r.type) for r in self.recorder.received(entity_id)]

    async def declared(self, entity_id: str) -> None:
        device_id = FLEET.entities[entity_id].device_id

        async def probe() -> bool:
            connection = self.gateway.connections.get(device_id)
            return connection is not None and connection.profiles is not None

        await until(probe)

    async def start_charging(self, entity_id: str) -> backends.Delivery:
        start = self.delivery(entity_id, CommandType.START_CHARGING)
        assert isinstance((await self.send(start))[0], backends.Accepted)
        assert (await self.result_of(start.order.command_id)).succeeded
        return start


async def until(probe: Callable[[], Any], deadline_s: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + deadline_s
    while True:
        result = probe()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out after {deadline_s} s")
        await asyncio.sleep(0.02)


async def serve(app: FastAPI, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve())
    await until(lambda: server.started)
    return server, task


@pytest.fixture
async def rig(redis_url: str) -> AsyncIterator[Rig]:
    port = free_port()
    settings = Settings(ocpp_gateway_port=port)
    ocpp = OcppSettings(call_timeout_s=CALL_TIMEOUT_S, heartbeat_interval_s=5, reconnect_wait_s=0.5)
    redis = aioredis.from_url(redis_url)
    recorder, faults = Recorder(), Faults(random.Random(7))
    reported: list[backends.DeviceResult] = []
    tokens = ResultTokens("test-secret")

    async def report(results: Sequence[backends.DeviceResult]) -> list[str]:
        reported.extend(results)
        return ["emit"] * len(results)

    context = backends.BackendContext(settings=settings, fleet=FLEET, redis=redis, callback_base_url=DISPATCH,
                                      token=tokens.token, entity_of=tokens.entity_of, report=report)
    backend = OcppBackend(context, ocpp)
    dispatch = FastAPI()
    assert backend.router is not None
    dispatch.include_router(backend.router)
    gateway = Gateway(settings, ocpp, redis, FLEET, transport=httpx.ASGITransport(app=dispatch))
    app = FastAPI()
    add_routes(app, gateway)
    server, serving = await serve(app, port)
    sim = OcppChargePoints(FLEET, recorder, faults, f"ws://127.0.0.1:{port}/ocpp", 0.005, passwords={"cp-locked": LOCKED_PASSWORD},
                           redis=redis)
    sim.by_entity["cp-mute"].profiles = []
    del sim.by_entity["cp-offline"]
    sim.start()
    rig = Rig(backend, gateway, sim, recorder, faults, redis, reported, tokens, dispatch)
    try:
        await asyncio.wait_for(sim.connected(), 10)
        for entity_id in sim.by_entity:
            await rig.declared(entity_id)
        yield rig
    finally:
        await sim.aclose()
        await gateway.aclose()
        server.should_exit = True
        await serving
        await backend.aclose()
        await redis.aclose()


async def test_start_then_stop_charging_each_succeed_by_their_transaction_messages(rig: Rig) -> None:
    start = rig.delivery("cp-1", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.Accepted) and answer.confirmation is backends.Confirmation.ASYNC
    assert (await rig.result_of(start.order.command_id)).succeeded
    assert await rig.finding(start) is backends.Finding.SUCCEEDED

    stop = rig.delivery("cp-1", CommandType.STOP_CHARGING)
    [answer] = await rig.send(stop)
    assert isinstance(answer, backends.Accepted)
    assert (await rig.result_of(stop.order.command_id)).succeeded
    assert await rig.finding(stop) is backends.Finding.SUCCEEDED
    assert rig.received("cp-1") == [(start.order.command_id, "StartCharging"), (stop.order.command_id, "StopCharging")]
    assert await OcppState(rig.redis).transaction("cp-1") is None


async def test_one_call_takes_several_charge_points_and_one_charge_points_commands_in_order(rig: Rig) -> None:
    start1, start2 = rig.delivery("cp-1", CommandType.START_CHARGING), rig.delivery("cp-2", CommandType.START_CHARGING)
    answers = await rig.send(start1, start2)
    assert all(isinstance(a, backends.Accepted) for a in answers), answers
    await rig.result_of(start1.order.command_id)
    await rig.result_of(start2.order.command_id)
    stop1 = rig.delivery("cp-1", CommandType.STOP_CHARGING)
    again = rig.delivery("cp-1", CommandType.START_CHARGING)
    answers = await rig.send(stop1, again)  # in order: the stop, then (once it is accepted) the start
    assert isinstance(answers[0], backends.Accepted)
    # The stop's StopTransaction may not be in yet: then the connector is still busy.
    assert isinstance(answers[1], (backends.Accepted, backends.Refused)), answers


async def test_a_long_command_id_is_correlated_by_the_gateways_record_not_the_message_id(rig: Rig) -> None:
    """The message id is a fresh uuid4 whatever the command id; the command (even one longer
    than OCPP's 36 characters) is found by its idTag, and kept whole in the gateway's record."""
    long_id = "x" * 64
    start = rig.delivery("cp-3", CommandType.START_CHARGING, command_id=long_id)
    assert isinstance((await rig.send(start))[0], backends.Accepted)
    assert (await rig.result_of(long_id)).succeeded  # matched back by its idTag
    assert rig.received("cp-3") == [(long_id, "StartCharging")]
    record = await OcppState(rig.redis).command("cp-3", long_id)
    assert record is not None and record.message_id is not None and len(record.message_id) == 36
    assert uuid.UUID(record.message_id).version == 4


async def test_a_stop_with_nothing_to_stop_is_refused_and_a_start_while_charging_starts_anew(rig: Rig) -> None:
    [no_transaction] = await rig.send(rig.delivery("cp-2", CommandType.STOP_CHARGING))
    assert isinstance(no_transaction, backends.Refused) and no_transaction.reason == "no_transaction"
    first = await rig.start_charging("cp-2")
    second = await rig.start_charging("cp-2")  # the running transaction is stopped first
    state = OcppState(rig.redis)
    running = await state.transaction("cp-2")
    tx_of = {c: record.transaction_id if (record := await state.command("cp-2", c.order.command_id)) else None
             for c in (first, second)}
    assert running is not None and running.id == tx_of[second] != tx_of[first]
    [old] = await rig.send(rig.delivery("cp-2", CommandType.STOP_CHARGING))
    assert isinstance(old, backends.Accepted)
    assert [t for _, t in rig.received("cp-2")] == ["StartCharging", "StartCharging", "StopCharging"]


async def test_a_type_the_charge_point_did_not_declare_is_refused_as_not_supported(rig: Rig) -> None:
    [answer] = await rig.send(rig.delivery("cp-mute", CommandType.START_CHARGING))
    assert isinstance(answer, backends.Refused) and answer.reason == "command_not_supported"
    [answer] = await rig.send(rig.delivery("cp-1", CommandType.RESET))
    assert isinstance(answer, backends.Refused) and answer.reason == "command_not_supported"
    assert rig.received("cp-mute") == []


async def test_a_charge_point_never_seen_is_refused_and_one_offline_not_delivered(rig: Rig) -> None:
    [answer] = await rig.send(rig.delivery("cp-offline", CommandType.START_CHARGING))
    assert isinstance(answer, backends.Refused) and answer.reason == "unknown_device"
    await set_ocpp_seen(rig.redis, "cp-offline", "2026-01-01T00:00:00Z")
    [answer] = await rig.send(rig.delivery("cp-offline", CommandType.START_CHARGING))
    assert isinstance(answer, backends.NotDelivered) and answer.reason == "not_connected"
    # A link left behind by a gateway that died: the request cannot leave either.
    await set_ocpp_link(rig.redis, "cp-offline", f"http://127.0.0.1:{free_port()}", "x")
    [answer] = await rig.send(rig.delivery("cp-offline", CommandType.START_CHARGING))
    assert isinstance(answer, backends.NotDelivered) and answer.reason == "not_connected"


async def test_the_link_follows_the_connection(rig: Rig) -> None:
    link = await OcppState(rig.redis).link("cp-4")
    assert link.url == rig.gateway.url
    assert 0 < link.ttl_s <= 15
    old = rig.gateway.connections["cp-4"]
    await old.websocket.close()

    def reconnected() -> bool:  # and booted, and declared again
        new = rig.gateway.connections.get("cp-4")
        return new is not None and new is not old and new.profiles is not None

    await until(reconnected)
    assert (await OcppState(rig.redis).link("cp-4")).conn == rig.gateway.connections["cp-4"].id
    await rig.start_charging("cp-4")


async def test_dispatch_reaches_the_replica_that_holds_the_charge_point(rig: Rig) -> None:
    """cp-1 moves from replica A to replica B (rebooted on the way): the link follows it, and
    commands and results go through B; replica A answers for cp-1 no more."""
    await rig.start_charging("cp-1")
    port = free_port()
    other = Gateway(Settings(ocpp_gateway_port=port), rig.gateway.ocpp, rig.redis, FLEET,
                    transport=httpx.ASGITransport(app=rig.dispatch))
    app = FastAPI()
    add_routes(app, other)
    server, serving = await serve(app, port)
    moved = SimChargePoint(FLEET.entities["cp-1"], f"ws://127.0.0.1:{port}/ocpp", rig.recorder, rig.faults, 0.005,
                           commands=OcppState(rig.redis))
    running = None
    try:
        await rig.sim.stop("cp-1")
        await until(lambda: "cp-1" not in rig.gateway.connections)
        running = asyncio.ensure_future(moved.run())
        await until(lambda: "cp-1" in other.connections and other.connections["cp-1"].profiles is not None)
        assert (await OcppState(rig.redis).link("cp-1")).url == other.url != rig.gateway.url
        start = await rig.start_charging("cp-1")  # the rebooted charge point was idle
        stop = rig.delivery("cp-1", CommandType.STOP_CHARGING)
        assert isinstance((await rig.send(stop))[0], backends.Accepted)
        assert (await rig.result_of(stop.order.command_id)).succeeded
        assert rig.received("cp-1")[-2:] == [(start.order.command_id, "StartCharging"), (stop.order.command_id, "StopCharging")]
    finally:
        if running is not None:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        moved.close()
        await other.aclose()
        server.should_exit = True
        await serving


def plan(rig: Rig, entity_id: str, kind: FaultKind, **extra: Any) -> None:
    rig.faults.put(FaultPlan(devices=[entity_id], probability=1, kinds=[kind], **extra))


async def test_a_5xx_is_a_call_error_before_acting_not_delivered(rig: Rig) -> None:
    plan(rig, "cp-5", FaultKind.ERROR_5XX)
    start = rig.delivery("cp-5", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.NotDelivered) and answer.reason == "call_error" and "InternalError" in answer.detail
    assert rig.received("cp-5") == []
    assert await rig.finding(start) is backends.Finding.UNKNOWN


async def test_a_429_is_not_delivered_with_the_pause_it_asked_for(rig: Rig) -> None:
    plan(rig, "cp-5", FaultKind.RATE_LIMITED, retry_after_s=3)
    [answer] = await rig.send(rig.delivery("cp-5", CommandType.START_CHARGING))
    assert isinstance(answer, backends.NotDelivered) and answer.retry_after_s == 3
    assert rig.received("cp-5") == []


async def test_latency_within_the_call_timeout_is_accepted(rig: Rig) -> None:
    plan(rig, "cp-6", FaultKind.LATENCY, latency_ms=300)
    start = rig.delivery("cp-6", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.Accepted)
    assert (await rig.result_of(start.order.command_id)).succeeded
    assert len(rig.received("cp-6")) == 1


async def test_latency_past_the_call_timeout_is_unknown(rig: Rig) -> None:
    plan(rig, "cp-6", FaultKind.LATENCY, latency_ms=int(CALL_TIMEOUT_S * 1000) + 500)
    start = rig.delivery("cp-6", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.DeliveryUnknown)


async def test_timeout_after_acting_is_unknown_and_the_transaction_message_says_what_happened(rig: Rig) -> None:
    plan(rig, "cp-7", FaultKind.TIMEOUT_AFTER_ACT, hang_s=3)
    start = rig.delivery("cp-7", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.DeliveryUnknown) and "no_answer" in answer.detail
    assert (await rig.result_of(start.order.command_id)).succeeded
    assert await rig.finding(start) is backends.Finding.SUCCEEDED
    assert rig.received("cp-7") == [(start.order.command_id, "StartCharging")]


async def test_a_dropped_connection_is_unknown_and_the_transaction_comes_after_reconnecting(rig: Rig) -> None:
    plan(rig, "cp-8", FaultKind.DROP_CONNECTION)
    start = rig.delivery("cp-8", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.DeliveryUnknown) and "connection_closed" in answer.detail
    rig.faults.clear()
    assert (await rig.result_of(start.order.command_id)).succeeded
    assert await rig.finding(start) is backends.Finding.SUCCEEDED
    assert rig.received("cp-8") == [(start.order.command_id, "StartCharging")]


async def test_a_lost_transaction_message_is_found_by_reading_the_charge_point_back(rig: Rig) -> None:
    plan(rig, "cp-9", FaultKind.LOSE_CALLBACK)
    start = rig.delivery("cp-9", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.Accepted)
    rig.faults.clear()
    await asyncio.sleep(0.3)
    assert await rig.finding(start) is backends.Finding.SUCCEEDED  # connector 1 is charging
    assert all(r.command_id != start.order.command_id for r in rig.reported)
    assert rig.received("cp-9") == [(start.order.command_id, "StartCharging")]
    # A stop of a transaction the gateway never heard of: nothing to stop, as far as it knows.
    [answer] = await rig.send(rig.delivery("cp-9", CommandType.STOP_CHARGING))
    assert isinstance(answer, backends.Refused) and answer.reason == "no_transaction"


async def test_a_command_sent_and_never_answered_is_pending_not_unknown(rig: Rig) -> None:
    """Sent without an answer, the charge point may have it: asking must never let it be sent again."""
    d = rig.delivery("cp-5", CommandType.START_CHARGING)
    await set_ocpp_command(rig.redis, "cp-5", d.order.command_id, CommandType.START_CHARGING, CommandState.SENDING)
    assert await rig.finding(d) is backends.Finding.PENDING
    assert await rig.finding(rig.delivery("cp-5", CommandType.START_CHARGING)) is backends.Finding.UNKNOWN


async def test_a_stop_under_faults(rig: Rig) -> None:
    await rig.start_charging("cp-4")
    plan(rig, "cp-4", FaultKind.TIMEOUT_AFTER_ACT, hang_s=3)
    stop = rig.delivery("cp-4", CommandType.STOP_CHARGING)
    [answer] = await rig.send(stop)
    assert isinstance(answer, backends.DeliveryUnknown)
    assert (await rig.result_of(stop.order.command_id)).succeeded
    assert [t for _, t in rig.received("cp-4")] == ["StartCharging", "StopCharging"]


async def test_results_need_the_token_dispatch_gave(rig: Rig) -> None:
    assert rig.backend.router is not None
    app = FastAPI()
    app.include_router(rig.backend.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=DISPATCH) as client:
        forged = {"results": [{"commandId": "c-1", "token": rig.tokens.token("cp-1", "c-2"), "succeeded": True}]}
        assert (await client.post(CALLBACK_PATH, json=forged)).status_code == 403
        genuine = {"results": [{"commandId": "c-1", "token": rig.tokens.token("cp-1", "c-1"), "succeeded": True}]}
        assert (await client.post(CALLBACK_PATH, json=genuine)).status_code == 200
    assert rig.reported[-1] == backends.DeviceResult("cp-1", "c-1", True, None)


async def test_the_gateway_api_needs_its_token(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.gateway.url) as client:
        assert (await client.get("/internal/v1/charge-points")).status_code == 401
        answer = await client.get("/internal/v1/charge-points", headers={"authorization": f"Bearer {rig.gateway.ocpp.gateway_token}"})
        listed = {c["entityId"]: c for c in answer.json()["chargePoints"]}
        assert listed["cp-1"]["profiles"] == ["Core", "RemoteTrigger"] and listed["cp-mute"]["profiles"] == []
        assert listed["cp-1"]["connectors"] == {"1": "Available"}


async def test_a_start_transaction_after_the_command_ended_failed_is_refused_and_not_reported(rig: Rig) -> None:
    """The charge point took the RemoteStartTransaction, but its StartTransaction comes after
    dercmd already said Failed (no confirmation by the deadline): the gateway answers the
    transaction with idTagInfo Expired (the charge point ends it) and reports no success."""
    from dercmd.events import CommandStatus
    from dercmd.ocpp_gateway import metrics as gateway_metrics
    from dercmd.state.delivery import Deliveries, Outcome

    rig.sim.by_entity["cp-4"].confirm_delay_s = 1.0  # its StartTransaction comes a second after it accepted
    refused_before = gateway_metrics.LATE_TRANSACTIONS._value.get()
    start = rig.delivery("cp-4", CommandType.START_CHARGING)
    # Dispatch's record of the delivery, as dispatch keeps it: claimed, sent, then given up on.
    deliveries = Deliveries(rig.redis)
    await deliveries.claim("cp-4", start.order.command_id, 1)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.Accepted)
    await deliveries.finish("cp-4", start.order.command_id, Outcome(CommandStatus.FAILED, "no_confirmation", "no transaction"))
    await until(lambda: gateway_metrics.LATE_TRANSACTIONS._value.get() == refused_before + 1, deadline_s=5)
    record = await rig.gateway.state.command("cp-4", start.order.command_id)
    assert record is not None and record.state is not CommandState.SUCCEEDED  # not confirmed, so never reported
    assert all(r.command_id != start.order.command_id for r in rig.reported)


async def test_any_message_keeps_a_charge_point_connected_without_heartbeats(rig: Rig) -> None:
    """OCPP 1.6 lets any message stand for a Heartbeat: a charge point that sends MeterValues
    and never a Heartbeat stays the link's holder past its three heartbeat intervals' TTL."""
    import websockets
    from ocpp.v16 import ChargePoint as Client
    from ocpp.v16 import call as calls

    from dercmd.protocols.ocpp import SUBPROTOCOL

    url = rig.gateway.url.replace("http://", "ws://") + "/ocpp/" + FLEET.entities["cp-offline"].device_id
    async with websockets.connect(url, subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        client = Client(FLEET.entities["cp-offline"].device_id, ws)
        listening = asyncio.ensure_future(client.start())
        try:
            await client.call(calls.BootNotification(charge_point_vendor="ABB", charge_point_model="Terra"))
            first = (await rig.gateway.state.link("cp-offline")).ttl_s
            assert first > 0
            # Half a heartbeat interval and a little more, MeterValues only: the link's TTL comes back up.
            interval = rig.gateway.ocpp.heartbeat_interval_s
            end = asyncio.get_running_loop().time() + interval / 2 + 1.5
            while asyncio.get_running_loop().time() < end:
                await client.call(calls.MeterValues(connector_id=1, meter_value=[
                    {"timestamp": datetime.now(UTC).isoformat(), "sampledValue": [{"value": "1"}]}]))
                await asyncio.sleep(0.25)
            link = await rig.gateway.state.link("cp-offline")
            assert link.conn is not None and link.ttl_s >= rig.gateway.ocpp.link_ttl_s - 2, (first, link)
        finally:
            listening.cancel()



@pytest.mark.parametrize("authorization", [None, basic_authorization("cp-locked", "a-wrong-password-0123456789"),
                                           basic_authorization("cp-1", LOCKED_PASSWORD), "Bearer " + LOCKED_PASSWORD])
async def test_a_charge_point_with_a_password_is_reached_only_with_it(rig: Rig, authorization: str | None) -> None:
    """Security profile 1: a connection under cp-locked's id without its password (none, a
    wrong one, another id's user, another scheme) is refused at the handshake, and the genuine
    charge point keeps its link and its commands."""
    import websockets

    holder = (await rig.gateway.state.link("cp-locked")).conn
    assert holder is not None
    url = rig.gateway.url.replace("http://", "ws://") + "/ocpp/cp-locked"
    headers = {"Authorization": authorization} if authorization else None
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(url, subprotocols=[SUBPROTOCOL], additional_headers=headers, open_timeout=5):  # type: ignore[list-item]
            pass
    assert (await rig.gateway.state.link("cp-locked")).conn == holder
    start = await rig.start_charging("cp-locked")
    assert rig.received("cp-locked") == [(start.order.command_id, "StartCharging")]


# -- message ids and the OCPP 1.6 JSON schemas (issue 20) ---------------------------------

@dataclass(frozen=True)
class Frame:
    charge_point: str
    sent: bool  # by the gateway (else: by the charge point)
    message: list[Any]


@pytest.fixture
def frames(monkeypatch: pytest.MonkeyPatch) -> list[Frame]:
    """Every OCPP-J frame the gateway exchanges with any charge point, in order, as it crossed
    the WebSocket. Requested before ``rig``, so the boots are among them."""
    import json

    from dercmd.ocpp_gateway import gateway as gateway_module

    seen: list[Frame] = []
    recv, send = gateway_module._Socket.recv, gateway_module._Socket.send

    def charge_point(socket: Any) -> str:
        return str(socket._websocket.url.path).rsplit("/", 1)[-1]

    async def recording_recv(self: Any) -> str:
        text = await recv(self)
        seen.append(Frame(charge_point(self), False, json.loads(text)))
        return text

    async def recording_send(self: Any, message: str) -> None:
        seen.append(Frame(charge_point(self), True, json.loads(message)))
        await send(self, message)

    monkeypatch.setattr(gateway_module._Socket, "recv", recording_recv)
    monkeypatch.setattr(gateway_module._Socket, "send", recording_send)
    return seen


def schema_violations(frames: Sequence[Frame]) -> tuple[list[str], list[str]]:
    """Each CALL checked against its action's OCPP 1.6 JSON schema and each CALLRESULT against
    the response schema of the CALL it answers (the schemas the ocpp package ships, read with
    ``jsonschema``, not through the package's own validation), each CALLERROR's shape and
    error code against OCPP-J's: the violations, and the actions seen (``Action`` for a CALL,
    ``Action.result``, ``Action.error``)."""
    import json
    from importlib import resources

    import jsonschema

    schemas = resources.files("ocpp.v16") / "schemas"
    calls: dict[tuple[str, str], str] = {}  # (charge point, message id) -> action
    error_codes = {"NotImplemented", "NotSupported", "InternalError", "ProtocolError", "SecurityError", "FormationViolation",
                   "PropertyConstraintViolation", "OccurenceConstraintViolation", "TypeConstraintViolation", "GenericError"}
    violations: list[str] = []
    seen: list[str] = []

    def check(name: str, payload: Any, where: str) -> None:
        schema = json.loads((schemas / f"{name}.json").read_text())
        validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
        violations.extend(f"{where} {name}: {e.message}" for e in validator.iter_errors(payload))

    for frame in frames:
        kind, unique_id = frame.message[0], frame.message[1]
        where = f"{frame.charge_point} {'gateway->cp' if frame.sent else 'cp->gateway'} {unique_id}"
        if not isinstance(unique_id, str) or not 0 < len(unique_id) <= 36:
            violations.append(f"{where}: message id {unique_id!r} is not a string of 1 to 36 characters")
        if kind == 2:
            _, _, action, payload = frame.message
            calls[(frame.charge_point, unique_id)] = action
            seen.append(action)
            check(action, payload, where)
        elif kind == 3:
            action = calls.get((frame.charge_point, unique_id))
            if action is None:
                violations.append(f"{where}: a CALLRESULT to no CALL")
                continue
            seen.append(f"{action}.result")
            check(f"{action}Response", frame.message[2], where)
        elif kind == 4:
            _, _, code, description, details = frame.message
            seen.append(f"{calls.get((frame.charge_point, unique_id))}.error")
            if code not in error_codes or not isinstance(description, str) or not isinstance(details, dict):
                violations.append(f"{where}: CALLERROR {frame.message!r}")
        else:
            violations.append(f"{where}: message type {kind!r}")
    return violations, seen


async def test_a_retry_after_a_call_error_has_a_new_message_id_on_the_same_connection(frames: list[Frame], rig: Rig) -> None:
    """The message id was the command id: a retry of a command after the charge point's
    CALLERROR reused it on the same connection, and a charge point that de-duplicates by
    message id could replay its error. Now every call has its own; the command is still
    recorded once, under its own id."""
    connection = rig.gateway.connections["cp-5"]
    plan(rig, "cp-5", FaultKind.ERROR_5XX)
    start = rig.delivery("cp-5", CommandType.START_CHARGING)
    [answer] = await rig.send(start)
    assert isinstance(answer, backends.NotDelivered) and answer.reason == "call_error"
    rig.faults.clear()
    [answer] = await rig.send(start)  # the same command again
    assert isinstance(answer, backends.Accepted)
    assert (await rig.result_of(start.order.command_id)).succeeded
    assert rig.gateway.connections["cp-5"] is connection  # one connection throughout
    ids = [f.message[1] for f in frames if f.charge_point == "cp-5" and f.sent and f.message[0] == 2
           and f.message[2] == "RemoteStartTransaction"]
    answers = [f.message[0] for f in frames if f.charge_point == "cp-5" and not f.sent and f.message[1] in ids]
    assert len(ids) == 2 and ids[0] != ids[1], ids
    assert answers == [4, 3]  # a CALLERROR to the first, a CALLRESULT to the retry
    assert start.order.command_id not in ids
    assert rig.received("cp-5") == [(start.order.command_id, "StartCharging")]
    record = await OcppState(rig.redis).command("cp-5", start.order.command_id)
    assert record is not None and record.message_id == ids[1]


async def test_every_call_and_answer_follows_the_ocpp_16_json_schemas(frames: list[Frame], rig: Rig) -> None:
    """Each frame of a run (boot, status, GetConfiguration, start and stop with their
    transaction messages, a TriggerMessage read-back, a CALLERROR, and a charge point of our
    own sending Heartbeat, Authorize and MeterValues) checked against the OCPP 1.6 schemas."""
    import websockets
    from ocpp.v16 import ChargePoint as Client
    from ocpp.v16 import call as calls

    start = await rig.start_charging("cp-1")
    stop = rig.delivery("cp-1", CommandType.STOP_CHARGING)
    assert isinstance((await rig.send(stop))[0], backends.Accepted)
    assert (await rig.result_of(stop.order.command_id)).succeeded
    plan(rig, "cp-5", FaultKind.ERROR_5XX)  # a CALLERROR
    assert isinstance((await rig.send(rig.delivery("cp-5", CommandType.START_CHARGING)))[0], backends.NotDelivered)
    plan(rig, "cp-9", FaultKind.LOSE_CALLBACK)  # read back with TriggerMessage(StatusNotification)
    lost = rig.delivery("cp-9", CommandType.START_CHARGING)
    assert isinstance((await rig.send(lost))[0], backends.Accepted)
    rig.faults.clear()
    assert await rig.finding(lost) is backends.Finding.SUCCEEDED

    device_id = FLEET.entities["cp-offline"].device_id
    url = rig.gateway.url.replace("http://", "ws://") + "/ocpp/" + device_id
    async with websockets.connect(url, subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        client = Client(device_id, ws)
        listening = asyncio.ensure_future(client.start())
        try:
            await client.call(calls.BootNotification(charge_point_vendor="ABB", charge_point_model="Terra"))
            await client.call(calls.Heartbeat())
            await client.call(calls.Authorize(id_tag="card-1"))
            await client.call(calls.MeterValues(connector_id=1, meter_value=[
                {"timestamp": datetime.now(UTC).isoformat(), "sampledValue": [{"value": "1"}]}]))
        finally:
            listening.cancel()

    violations, seen = schema_violations(frames)
    assert violations == []
    expected = {"BootNotification", "BootNotification.result", "StatusNotification", "StatusNotification.result",
                "GetConfiguration", "GetConfiguration.result", "RemoteStartTransaction", "RemoteStartTransaction.result",
                "RemoteStartTransaction.error", "StartTransaction", "StartTransaction.result", "RemoteStopTransaction",
                "RemoteStopTransaction.result", "StopTransaction", "StopTransaction.result", "TriggerMessage",
                "TriggerMessage.result", "Heartbeat", "Heartbeat.result", "Authorize", "Authorize.result", "MeterValues",
                "MeterValues.result"}
    assert expected <= set(seen), expected - set(seen)
    assert rig.received("cp-1") == [(start.order.command_id, "StartCharging"), (stop.order.command_id, "StopCharging")]


def test_the_schema_check_finds_a_violation() -> None:
    """The check above is not vacuous: a payload the schema forbids, and an answer to no call, are found."""
    bad = [Frame("cp-x", True, [2, "m-1", "RemoteStartTransaction", {"idTag": "x" * 21, "connectorId": 1}]),
           Frame("cp-x", False, [3, "m-1", {"status": "Maybe"}]),
           Frame("cp-x", False, [3, "m-2", {}])]
    violations, _ = schema_violations(bad)
    assert len(violations) == 3, violations


async def test_the_gateway_answers_a_payload_outside_the_schema_with_a_call_error(rig: Rig) -> None:
    """The ocpp package's own schema validation is on in the gateway: a BootNotification
    without its required chargePointModel is refused, not handled."""
    import json

    import websockets

    url = rig.gateway.url.replace("http://", "ws://") + "/ocpp/" + FLEET.entities["cp-offline"].device_id
    async with websockets.connect(url, subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps([2, "bad-boot", "BootNotification", {"chargePointVendor": "ABB"}]))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert answer[0] == 4 and answer[1] == "bad-boot", answer


async def test_a_replaced_connection_ends_with_an_info_line_not_an_error(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A charge point that reconnects replaces its old connection: that end is expected (the
    probe saw an error traceback for each, 86 in 24 s), so it is one info line."""
    import logging

    import websockets

    from ocpp.v16 import call

    old = rig.gateway.connections["cp-2"]
    assert old.charge_point is not None
    route = old.charge_point.route_message
    busy = asyncio.Event()

    async def slow_route(message: str) -> None:  # busy with a message when it is replaced
        busy.set()
        await until(lambda: old.websocket.application_state.name == "DISCONNECTED")
        await route(message)

    old.charge_point.route_message = slow_route  # type: ignore[method-assign]
    asking = asyncio.ensure_future(rig.gateway.call(old, call.GetConfiguration(key=["HeartbeatInterval"])))
    await until(busy.is_set)
    url = rig.gateway.url.replace("http://", "ws://") + "/ocpp/cp-2"
    with caplog.at_level(logging.INFO, logger="dercmd.ocpp_gateway.gateway"):
        async with websockets.connect(url, subprotocols=[SUBPROTOCOL], open_timeout=5):  # type: ignore[list-item]
            await until(lambda: old.closed.is_set())
        await until(lambda: any(r.getMessage() == "charge point connection replaced" for r in caplog.records))
    await asyncio.gather(asking, return_exceptions=True)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    replaced = next(r for r in caplog.records if r.getMessage() == "charge point connection replaced")
    assert replaced.levelno == logging.INFO and replaced.exc_info is None
