"""The sunspec-modbus backend against SunSpec devices nobody here wrote the reading of: register
images built from pysunspec2's model definitions (the SunSpec Alliance's library), served by
pymodbus's server, and what dercmd wrote read back with pysunspec2's own client.

Layouts: bases 40000, 0 and 50000 (the last silent at 40000 and 0); models in several orders,
with models dercmd does not use among them (101, 103, 113, 122); WMaxLimPct_SF 0, -1, -2;
WRtg_SF and WMax_SF 0, 1, 2; WMax (model 121) below WRtg (model 120), and no model 121 at all;
a layout change (model 121 inserted before 123, or models removed so 123's old address is gone)
between two commands on one live connection; a strict device that refuses writes to the points
it does not implement; an end model without its length register. Refusals: no marker, unit missing (0x04), model 123 missing or truncated,
DER models 701-704 only, every write refused. And the simulator as pysunspec2 reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from dercmd.dispatch import backends
from dercmd.dispatch.backends.sunspec_modbus import SunSpecModbusBackend
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.launcher import free_port
from dercmd.simulator.backends.sunspec import SunSpecSim
from dercmd.simulator.faults import Faults
from dercmd.simulator.recorder import Recorder

from . import sunspec_devices as sd

COMMON = (1, {"Mn": "acme", "Md": "inv-1", "SN": "SN-1", "Vr": "1.0", "DA": 1})


def nameplate(wrtg: int, sf: int) -> tuple[int, dict[str, int]]:
    return 120, {"DERTyp": 4, "WRtg": wrtg, "WRtg_SF": sf, "VARtg": 80, "VARtg_SF": 2}


def settings(wmax: int, sf: int) -> tuple[int, dict[str, int]]:
    return 121, {"WMax": wmax, "WMax_SF": sf, "VRef": 230, "VRefOfs": 0, "VMax": 253, "VMin": 207, "VAMax": 80,
                 "VMinMax_SF": 0, "VRef_SF": 0, "VRefOfs_SF": 0, "VAMax_SF": 2}


def controls(pct_sf: int, *, timers: bool = True) -> tuple[int, dict[str, int]]:
    values = {"Conn": 1, "WMaxLimPct": 100 * 10**-pct_sf, "WMaxLim_Ena": 0, "WMaxLimPct_SF": pct_sf}
    if timers:
        values |= {"Conn_WinTms": 0, "Conn_RvrtTms": 0, "WMaxLimPct_WinTms": 0, "WMaxLimPct_RvrtTms": 0, "WMaxLimPct_RmpTms": 10}
    return 123, values


INVERTER = (103, {"A": 10, "A_SF": 0, "W": 2300, "W_SF": 0, "St": 4})


@dataclass(frozen=True)
class Layout:
    name: str
    base: int
    models: tuple[tuple[int, Mapping[str, int]], ...]
    full_w: int  # what WMaxLimPct is a percentage of
    silent: frozenset[int] = frozenset()
    end_length: bool = True


LAYOUTS = [
    Layout("40000, WMax 6 kW below WRtg 8 kW", 40000,
           (COMMON, INVERTER, nameplate(8000, 0), settings(6000, 0), controls(-1)), 6000),
    Layout("0, 121 after 123, scale factors 2/1/0", 0,
           (COMMON, nameplate(80, 2), controls(0), settings(600, 1)), 6000),
    Layout("50000 only (silent at 40000 and 0), no 121, WMaxLimPct_SF -2", 50000,
           (COMMON, (101, {"A": 5, "A_SF": 0}), controls(-2), nameplate(800, 1)), 8000, silent=frozenset({40000, 0})),
    Layout("40000, models dercmd does not use around 123, end model without L", 40000,
           (COMMON, (113, {}), nameplate(5000, 0), (122, {"PVConn": 1}), settings(4000, 0), controls(-1), (101, {})), 4000,
           end_length=False),
]


def order(type: CommandType, **fields: Any) -> DispatchOrderV1:
    now = datetime.now(UTC)
    return DispatchOrderV1(command_id=f"c-{time.monotonic_ns()}", entity_id="pv", type=type, fence=1, accepted_at=now,
                           ordered_at=now, **fields)


@dataclass
class Rig:
    port: int
    devices: dict[int, sd.Device]
    backend: SunSpecModbusBackend
    fleet: Fleet

    async def send(self, type: CommandType, unit: int = 1, **fields: Any) -> backends.Accepted | backends.BackendError:
        o = order(type, **fields)
        [answer] = await self.backend.send([backends.Delivery(o, self.fleet.entities[f"pv-{unit}"], "t")])
        return answer

    async def read_back(self, unit: int = 1, base: int | None = None) -> dict[int, dict[str, Any]]:
        return await asyncio.to_thread(sd.read_back, self.port, unit, base)


@pytest.fixture
async def rig_for() -> AsyncIterator[Callable[..., Any]]:
    opened: list[tuple[Any, SunSpecModbusBackend]] = []

    async def make(devices: dict[int, sd.Device], *, timeout_s: float = 2.0, probe_timeout_s: float = 0.5) -> Rig:
        port = free_port()
        fleet = Fleet.model_validate({"entities": {f"pv-{u}": {"kind": "PV", "vendor": "acme", "backend": "sunspec-modbus",
                                                                "vendorDeviceId": str(u)} for u in {1, *devices}}})
        server = sd.serving(devices, port)
        await server.__aenter__()
        backend = SunSpecModbusBackend(fleet, ("127.0.0.1", port), timeout_s=timeout_s, probe_timeout_s=probe_timeout_s)
        opened.append((server, backend))
        return Rig(port, devices, backend, fleet)

    yield make
    for server, backend in opened:
        await backend.aclose()
        await server.__aexit__(None, None, None)


def untouched(before: sd.Image, after: sd.Image, *, except_model: int = 123) -> list[int]:
    """The addresses outside ``except_model`` whose registers changed."""
    start = after.addresses[except_model]
    mine = range(start, start + 2 + after.registers[start + 1])
    return [a for a, v in before.registers.items() if a not in mine and after.registers.get(a) != v]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
async def test_every_command_lands_in_model_123_as_pysunspec2_reads_it(rig_for: Callable[..., Any], layout: Layout) -> None:
    image = sd.build(layout.base, layout.models, end_length=layout.end_length)
    pristine = sd.build(layout.base, layout.models, end_length=layout.end_length)
    device = sd.Device(image, silent=layout.silent)
    rig = await rig_for({1: device})
    started = time.monotonic()
    answer = await rig.send(CommandType.LIMIT_FEED_IN, value=3000)
    assert isinstance(answer, backends.Accepted), answer
    assert time.monotonic() - started < 4  # a device silent at 40000 and 0 costs two probe deadlines, not a failure
    read = (await rig.read_back())[123]
    expected = 100 * 3000 / layout.full_w  # WMaxLimPct is a percentage of WMax (WRtg when there is no 121)
    sf = read["WMaxLimPct_SF"]
    assert expected - 10**sf < read["WMaxLimPct:c"] <= expected and read["WMaxLim_Ena"] == 1
    assert untouched(pristine, image) == []  # nothing written outside model 123

    base = layout.base  # pysunspec2 found it above: it needs not wait out the silent bases again
    assert isinstance(await rig.send(CommandType.LIMIT_PRODUCTION_POWER, percentage=40), backends.Accepted)
    read = (await rig.read_back(base=base))[123]
    assert (read["WMaxLimPct:c"], read["WMaxLim_Ena"], read["Conn"]) == (40, 1, 1)
    assert isinstance(await rig.send(CommandType.DISCONNECT), backends.Accepted)
    read = (await rig.read_back(base=base))[123]
    assert (read["Conn"], read["WMaxLimPct:c"]) == (0, 40)  # a disconnect leaves the limit
    assert isinstance(await rig.send(CommandType.STOP_FEED_IN), backends.Accepted)
    assert (await rig.read_back(base=base))[123]["WMaxLimPct:c"] == 0
    assert isinstance(await rig.send(CommandType.RESET), backends.Accepted)
    read = (await rig.read_back(base=base))[123]
    assert (read["Conn"], read["WMaxLimPct:c"], read["WMaxLim_Ena"], read["WMaxLimPct_RmpTms"]) == (1, 100, 0, 10)
    assert untouched(pristine, image) == []


async def test_a_layout_change_under_a_live_connection_is_found_before_anything_is_written(rig_for: Callable[..., Any]) -> None:
    before = (COMMON, nameplate(8000, 0), controls(-1))
    device = sd.Device(sd.build(40000, before))
    rig = await rig_for({1: device})
    assert isinstance(await rig.send(CommandType.LIMIT_PRODUCTION_POWER, percentage=30), backends.Accepted)
    # The unit is reconfigured: model 121 now sits where model 123 was; the connection stays up.
    after = (COMMON, nameplate(8000, 0), settings(6000, 0), controls(-1))
    device.image = sd.build(40000, after)
    pristine = sd.build(40000, after)
    answer = await rig.send(CommandType.LIMIT_FEED_IN, value=3000)
    assert isinstance(answer, backends.Accepted), answer
    read = await rig.read_back()
    assert (read[121]["VMax"], read[121]["VMin"], read[121]["VAMax"]) == (253, 207, 80)  # model 121 untouched
    assert untouched(pristine, device.image) == []
    assert (read[123]["WMaxLimPct:c"], read[123]["WMaxLim_Ena"]) == (50, 1)  # 3 kW of WMax 6 kW


async def test_a_layout_that_shrank_under_a_live_connection_is_discovered_again(rig_for: Callable[..., Any]) -> None:
    device = sd.Device(sd.build(40000, (COMMON, nameplate(8000, 0), settings(6000, 0), (122, {}), controls(-1))))
    rig = await rig_for({1: device})
    assert isinstance(await rig.send(CommandType.LIMIT_PRODUCTION_POWER, percentage=30), backends.Accepted)
    device.image = sd.build(40000, (COMMON, controls(-1)))  # model 123's old address is past the new end
    answer = await rig.send(CommandType.LIMIT_PRODUCTION_POWER, percentage=60)
    assert isinstance(answer, backends.Accepted), answer
    assert (await rig.read_back())[123]["WMaxLimPct:c"] == 60


async def test_a_device_refusing_writes_to_unimplemented_points_is_limited_stopped_and_disconnected(
        rig_for: Callable[..., Any]) -> None:
    models = (COMMON, nameplate(5000, 0), controls(-1, timers=False))
    device = sd.Device(sd.build(40000, models), strict=True)
    rig = await rig_for({1: device})
    # pysunspec2 can limit it (the device is sound):
    await asyncio.to_thread(sd.limit_with_pysunspec2, rig.port, 1, 90)
    for type, fields in [(CommandType.LIMIT_FEED_IN, {"value": 2000}), (CommandType.STOP_FEED_IN, {}),
                         (CommandType.DISCONNECT, {}), (CommandType.LIMIT_PRODUCTION_POWER, {"percentage": 55}),
                         (CommandType.RESET, {})]:
        answer = await rig.send(type, **fields)
        assert isinstance(answer, backends.Accepted), (type, answer)
    read = (await rig.read_back())[123]
    assert (read["Conn"], read["WMaxLimPct:c"], read["WMaxLim_Ena"]) == (1, 100, 0)
    for timer in ("Conn_WinTms", "Conn_RvrtTms", "WMaxLimPct_WinTms", "WMaxLimPct_RvrtTms", "WMaxLimPct_RmpTms"):
        assert read[timer] is None, timer  # still not implemented: never written


async def test_scale_factors_hold_fractions_of_a_percent(rig_for: Callable[..., Any]) -> None:
    device = sd.Device(sd.build(40000, (COMMON, nameplate(5000, 0), controls(-2))))
    rig = await rig_for({1: device})
    assert isinstance(await rig.send(CommandType.LIMIT_FEED_IN, value=1234), backends.Accepted)
    assert (await rig.read_back())[123]["WMaxLimPct:c"] == pytest.approx(24.68)


@pytest.mark.parametrize(("models", "options", "error", "reason"), [
    ((COMMON, controls(-1)), {"marker": (0, 0)}, backends.Refused, "not_sunspec"),
    ((COMMON, nameplate(5000, 0)), {}, backends.Refused, "no_controls_model"),
    ((COMMON, nameplate(5000, 0), controls(-1)), {"lengths": {123: 10}}, backends.Refused, "controls_truncated"),
    ((COMMON, (701, {"W": 100}), (702, {"WMaxRtg": 5000})), {}, backends.Refused, "der_models_unsupported"),
    ((COMMON, nameplate(5000, 0), controls(-1)), {"locked": True}, backends.Refused, "write_refused"),
    (None, {}, backends.NotDelivered, "unit_missing"),
], ids=["no marker", "no 123", "123 truncated", "DER models only", "writes refused", "unit missing (0x04)"])
async def test_what_cannot_be_driven_says_why(rig_for: Callable[..., Any], models: Any, options: dict[str, Any],
                                              error: type, reason: str) -> None:
    devices: dict[int, sd.Device] = {}
    if models is not None:
        image = sd.build(40000, models, lengths=options.get("lengths"))
        if "marker" in options:
            image.registers[40000], image.registers[40001] = options["marker"]
        devices[1] = sd.Device(image, locked=options.get("locked", False))
    else:
        devices[2] = sd.Device(sd.build(40000, (COMMON, controls(-1))))  # the gateway has another unit
    rig = await rig_for(devices)
    answer = await rig.send(CommandType.STOP_FEED_IN)
    assert isinstance(answer, error), answer
    assert answer.reason == reason, answer


async def test_the_simulator_reads_as_the_models_define_and_holds_fractions_of_a_percent() -> None:
    fleet = Fleet.model_validate({"entities": {"pv-1": {"kind": "PV", "vendor": "acme", "backend": "sunspec-modbus"}}})
    port = free_port()
    sim = SunSpecSim(fleet, Recorder(), Faults(), "127.0.0.1", port)
    await sim.start()
    backend = SunSpecModbusBackend(fleet, ("127.0.0.1", port), timeout_s=2.0)
    try:
        read = await asyncio.to_thread(sd.read_back, port, 1)
        assert read[1]["Mn"] == "acme" and read[120]["WRtg:c"] == 5000
        # What the simulated unit does not measure reads as not implemented, not as 0:
        assert (read[103]["A"], read[103]["Hz"], read[103]["PF"], read[103]["St"], read[120]["VARtg"]) == (None,) * 5
        assert read[103]["W:c"] == 5000
        o = order(CommandType.LIMIT_FEED_IN, value=1230)
        [answer] = await backend.send([backends.Delivery(o, fleet.entities["pv-1"], "t")])
        assert isinstance(answer, backends.Accepted), answer
        assert (await asyncio.to_thread(sd.read_back, port, 1))[123]["WMaxLimPct:c"] == pytest.approx(24.6)
        state = sim.by_entity["pv-1"].measurements(datetime.now(UTC))
        assert (state["activePowerW"], state["limitPercentage"]) == (1230, 25)  # 24.6 % of 5 kW, not 24 %
    finally:
        await backend.aclose()
        await sim.aclose()
