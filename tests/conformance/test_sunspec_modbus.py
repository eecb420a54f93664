"""SunSpec inverters on Modbus TCP against the simulator's Modbus server (one unit per entity)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from dercmd.dispatch.backends.sunspec_modbus import SunSpecModbusBackend
from dercmd.events import CommandType
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.launcher import free_port
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

from .base import BackendConformance, Case, Results, World, served

FLEET = {"entities": {"pv-a": {"kind": "PV", "vendor": "sma", "backend": "sunspec-modbus"},
                      "pv-b": {"kind": "PV", "vendor": "fronius", "backend": "sunspec-modbus", "vendorDeviceId": "7"}}}


class TestSunSpecModbusConformance(BackendConformance):
    says_when_to_retry = False  # Modbus has busy, not "busy for n seconds"

    @pytest.fixture
    async def world(self, tmp_path: Path) -> AsyncIterator[World]:
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
        settings = Settings(fleet_file=str(tmp_path / "fleet.yaml"), sim_report_interval_s=0, sim_modbus_port=free_port())
        fleet = Fleet.load(settings.fleet_file)
        sim = create_app(settings)
        async with served(sim):
            backend = SunSpecModbusBackend(fleet, ("127.0.0.1", settings.sim_modbus_port), timeout_s=1.0)
            await backend.start()
            a, b = fleet.entities["pv-a"], fleet.entities["pv-b"]
            cases = [Case(a, CommandType.RESET), Case(a, CommandType.DISCONNECT), Case(b, CommandType.LIMIT_FEED_IN, 3000),
                     Case(b, CommandType.STOP_FEED_IN), Case(a, CommandType.LIMIT_PRODUCTION_POWER, percentage=40)]
            try:
                yield World(
                    backend=backend, faults=sim.state.faults, results=Results(), cases=cases,
                    faulty=Case(a, CommandType.LIMIT_FEED_IN, 2000),
                    stranger=Entity(kind=EntityKind.PV, vendor="sma", backend="sunspec-modbus", id="not-a-unit",
                                    vendor_device_id="200"),
                    received=lambda entity_id: _received(sim, entity_id),
                )
            finally:
                await backend.aclose()


async def _received(sim, entity_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.command_id for r in sim.state.recorder.received(entity_id)]
