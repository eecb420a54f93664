"""The sunspec-modbus backend and pymodbus against the simulator's Modbus server, in this process
over real TCP: what each command leaves on the device, the device's own revert timer, what the
server refuses, and the errors a caller must tell apart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pymodbus.client import AsyncModbusTcpClient

from dercmd.dispatch import backends
from dercmd.dispatch.backends.sunspec_modbus import SunSpecModbusBackend
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.launcher import free_port
from dercmd.protocols import sunspec as ss
from dercmd.simulator.faults import FaultKind, FaultPlan, Faults
from dercmd.simulator.recorder import Recorder
from dercmd.simulator.backends.sunspec import MODELS, SunSpecSim

FLEET = Fleet.model_validate({"entities": {
    "pv-1": {"kind": "PV", "vendor": "sma", "backend": "sunspec-modbus"},
    "pv-2": {"kind": "PV", "vendor": "sma", "backend": "sunspec-modbus", "assets": ["a", "b"]},
    "pv-far": {"kind": "PV", "vendor": "sma", "backend": "sunspec-modbus", "vendorDeviceId": "192.0.2.1:502/1"},
    "pv-other": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"},
}})


@dataclass
class Rig:
    sim: SunSpecSim
    backend: SunSpecModbusBackend
    port: int

    async def send(self, entity_id: str, type: CommandType, **fields: object) -> backends.Accepted | backends.BackendError:
        now = datetime.now(UTC)
        order = DispatchOrderV1(command_id=f"c-{time.monotonic_ns()}", entity_id=entity_id, type=type, fence=1,
                                accepted_at=now, ordered_at=now, **fields)  # type: ignore[arg-type]
        [answer] = await self.backend.send([backends.Delivery(order, FLEET.entities[entity_id], "token")])
        self.last = order
        return answer

    def state(self, entity_id: str) -> dict[str, object]:
        return self.sim.by_entity[entity_id].measurements(datetime.now(UTC))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    port = free_port()
    sim = SunSpecSim(FLEET, Recorder(), Faults(), "127.0.0.1", port)
    await sim.start()
    backend = SunSpecModbusBackend(FLEET, ("127.0.0.1", port), timeout_s=0.5)
    try:
        yield Rig(sim, backend, port)
    finally:
        await backend.aclose()
        await sim.aclose()


def test_units_follow_the_sorted_entity_ids_and_far_devices_are_not_served() -> None:
    sim = SunSpecSim(FLEET, Recorder(), Faults(), "127.0.0.1", 0)
    assert {u: unit.entity.id for u, unit in sim.units.items()} == {1: "pv-1", 2: "pv-2"}  # pv-far's unit 1 is on another server
    backend = SunSpecModbusBackend(FLEET, ("127.0.0.1", 1))
    assert backend.address(FLEET.entities["pv-1"]) == ss.Address("127.0.0.1", 1, 1)
    assert backend.address(FLEET.entities["pv-far"]) == ss.Address("192.0.2.1", 502, 1)


async def test_each_command_leaves_the_device_as_it_says(rig: Rig) -> None:
    assert isinstance(await rig.send("pv-1", CommandType.LIMIT_FEED_IN, value=2500), backends.Accepted)
    assert rig.state("pv-1") == {"activePowerW": 2500, "limitPercentage": 50, "connected": True}
    assert rig.sim.units[1].controls.wmaxlim_pct == 500  # WMaxLimPct_SF -1: 50.0 % of 5 kW
    await rig.send("pv-1", CommandType.STOP_FEED_IN)
    assert rig.state("pv-1")["activePowerW"] == 0
    await rig.send("pv-1", CommandType.DISCONNECT)
    assert rig.state("pv-1")["connected"] is False
    await rig.send("pv-1", CommandType.LIMIT_PRODUCTION_POWER, percentage=70)
    assert rig.state("pv-1") == {"activePowerW": 0, "limitPercentage": 70, "connected": False}  # a limit does not reconnect
    await rig.send("pv-1", CommandType.RESET)
    assert rig.state("pv-1") == {"activePowerW": 5000, "limitPercentage": 100, "connected": True}
    # A device of two inverters is rated 10 kW: 2.5 kW is a quarter of it.
    await rig.send("pv-2", CommandType.LIMIT_FEED_IN, value=2500)
    assert rig.state("pv-2")["limitPercentage"] == 25
    received = rig.sim.recorder.received("pv-1")
    assert [(r.type, r.value, r.percentage) for r in received] == [
        ("LimitFeedIn", 2500, None), ("StopFeedIn", None, None), ("Disconnect", None, None),
        ("LimitProductionPower", None, 70), ("Reset", None, None)]


async def test_a_window_runs_on_the_device_timer_and_dercmds_revert_is_harmless_after_it(rig: Rig) -> None:
    end_at = datetime.now(UTC) + timedelta(seconds=1.2)
    assert isinstance(await rig.send("pv-1", CommandType.LIMIT_PRODUCTION_POWER, percentage=30, end_at=end_at), backends.Accepted)
    unit = rig.sim.units[1]
    assert unit.controls.wmaxlim_pct_rvrt_tms == 2  # 1.2 s left, rounded up
    assert rig.state("pv-1")["limitPercentage"] == 30
    assert rig.sim.recorder.received("pv-1")[-1].end_at is not None
    await asyncio.sleep(2.1)
    assert rig.state("pv-1")["limitPercentage"] == 100
    assert unit.read(MODELS[ss.CONTROLS].body + 7, 1, asyncio.get_running_loop().time()) == [0]  # WMaxLim_Ena dropped
    revert = await rig.send("pv-1", CommandType.LIMIT_PRODUCTION_POWER, percentage=100, revert_of="w-1")
    assert isinstance(revert, backends.Accepted)
    assert rig.state("pv-1")["limitPercentage"] == 100 and unit.controls.wmaxlim_pct_rvrt_tms == 0


async def test_a_window_already_over_and_assets_are_refused_before_anything_is_written(rig: Rig) -> None:
    past = await rig.send("pv-1", CommandType.LIMIT_PRODUCTION_POWER, percentage=30, end_at=datetime.now(UTC) - timedelta(seconds=1))
    assets = await rig.send("pv-2", CommandType.LIMIT_PRODUCTION_POWER, percentage=30, asset_identifiers=("a",))
    assert isinstance(past, backends.Refused) and past.reason == "end_at_in_the_past"
    assert isinstance(assets, backends.Refused) and assets.reason == "assets_unsupported"
    assert rig.sim.recorder.total == 0


async def test_nothing_listening_or_no_route_is_not_delivered() -> None:
    backend = SunSpecModbusBackend(FLEET, ("127.0.0.1", free_port()), timeout_s=0.5)
    now = datetime.now(UTC)
    order = DispatchOrderV1(command_id="c-x", entity_id="pv-1", type=CommandType.RESET, fence=1, accepted_at=now, ordered_at=now)
    [refused] = await backend.send([backends.Delivery(order, FLEET.entities["pv-1"], "t")])
    assert isinstance(refused, backends.NotDelivered), refused
    started = time.monotonic()
    [far] = await backend.send([backends.Delivery(order.model_copy(update={"entity_id": "pv-far"}), FLEET.entities["pv-far"], "t")])
    assert isinstance(far, backends.NotDelivered), far  # TEST-NET-1: no route, or the connect times out
    assert time.monotonic() - started < 2
    await backend.aclose()


async def test_a_dropped_connection_is_noticed_at_once_not_at_the_timeout(rig: Rig) -> None:
    slow = SunSpecModbusBackend(FLEET, ("127.0.0.1", rig.port), timeout_s=5)
    rig.sim.faults.put(FaultPlan(devices=["pv-1"], probability=1, kinds=[FaultKind.DROP_CONNECTION]))
    now = datetime.now(UTC)
    order = DispatchOrderV1(command_id="c-drop", entity_id="pv-1", type=CommandType.STOP_FEED_IN, fence=1, accepted_at=now, ordered_at=now)
    started = time.monotonic()
    [answer] = await slow.send([backends.Delivery(order, FLEET.entities["pv-1"], "t")])
    assert isinstance(answer, backends.DeliveryUnknown), answer
    assert time.monotonic() - started < 2
    rig.sim.faults.clear()
    [outcome] = await slow.outcomes([backends.Query(FLEET.entities["pv-1"], "c-drop")])
    assert outcome.finding is backends.Finding.SUCCEEDED
    await slow.aclose()


async def test_many_units_in_one_call_and_one_units_commands_in_order(rig: Rig) -> None:
    now = datetime.now(UTC)
    orders = [DispatchOrderV1(command_id=f"c-{i}", entity_id=e, type=CommandType.LIMIT_PRODUCTION_POWER, percentage=p, fence=1,
                              accepted_at=now, ordered_at=now)
              for i, (e, p) in enumerate([("pv-1", 10), ("pv-2", 20), ("pv-1", 30), ("pv-2", 40), ("pv-1", 50)])]
    answers = await rig.backend.send([backends.Delivery(o, FLEET.entities[o.entity_id], "t") for o in orders])
    assert all(isinstance(a, backends.Accepted) for a in answers), answers
    assert [r.percentage for r in rig.sim.recorder.received("pv-1")] == [10, 30, 50]
    assert rig.state("pv-1")["limitPercentage"] == 50 and rig.state("pv-2")["limitPercentage"] == 40


async def test_the_server_refuses_read_only_registers_bad_values_and_unknown_units(rig: Rig) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=rig.port, timeout=1, retries=0)
    await client.connect()
    unit = {ss.UNIT_KEYWORD: 1}
    try:
        marker = await client.read_holding_registers(40000, count=2, **unit)
        assert list(marker.registers) == list(ss.MARKER)
        rated = MODELS[ss.NAMEPLATE].body + 1
        assert (await client.write_registers(rated, [1], **unit)).exception_code == ss.ILLEGAL_ADDRESS
        conn = MODELS[ss.CONTROLS].body + 2
        assert (await client.write_registers(conn, [7], **unit)).exception_code == ss.ILLEGAL_VALUE
        assert (await client.read_holding_registers(40000, count=2, **{ss.UNIT_KEYWORD: 99})).exception_code == ss.GATEWAY_PATH_UNAVAILABLE
        assert not (await client.write_register(conn, 0, **unit)).isError()  # function 6: a write without a tag
        assert rig.state("pv-1")["connected"] is False and rig.sim.recorder.total == 0  # no command, no receipt
    finally:
        client.close()


async def test_busy_before_the_write_is_not_delivered_and_nothing_changes(rig: Rig) -> None:
    rig.sim.faults.put(FaultPlan(devices=["pv-1"], probability=1, kinds=[FaultKind.ERROR_5XX]))
    answer = await rig.send("pv-1", CommandType.STOP_FEED_IN)
    assert isinstance(answer, backends.NotDelivered), answer
    assert rig.state("pv-1")["activePowerW"] == 5000 and rig.sim.recorder.total == 0
    [outcome] = await rig.backend.outcomes([backends.Query(FLEET.entities["pv-1"], rig.last.command_id, rig.last)])
    assert outcome.finding is backends.Finding.UNKNOWN
