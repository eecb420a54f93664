"""The native-window backend against its simulator (bulk REST, the answer is the confirmation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from dercmd.dispatch.backends.native_window import NativeWindowBackend
from dercmd.events import CommandType
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.protocols.native_window import NativeWindowClient
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

from .base import BackendConformance, Case, Results, World, recorded, served

TOKEN = "conformance-native-token"
FLEET = {"entities": {"dev-c": {"kind": "PV", "vendor": "gridbox", "backend": "native-window", "assets": ["a", "b"]},
                      "ev-c": {"kind": "EV", "vendor": "gridbox", "backend": "native-window"}}}


class TestNativeWindowConformance(BackendConformance):
    @pytest.fixture
    async def world(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
        monkeypatch.setenv("DERCMD_NATIVE_WINDOW_TOKEN", TOKEN)
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
        settings = Settings(fleet_file=str(tmp_path / "fleet.yaml"), sim_report_interval_s=0)
        fleet = Fleet.load(settings.fleet_file)
        sim = create_app(settings)
        async with served(sim) as sim_url:
            backend = NativeWindowBackend(NativeWindowClient(f"{sim_url}/native-window", TOKEN, timeout_s=1.0))
            await backend.start()
            dev, ev = fleet.entities["dev-c"], fleet.entities["ev-c"]
            cases = [Case(ev, CommandType.START_CHARGING), Case(ev, CommandType.STOP_CHARGING), Case(dev, CommandType.RESET),
                     Case(dev, CommandType.DISCONNECT), Case(dev, CommandType.LIMIT_FEED_IN, 3000), Case(dev, CommandType.STOP_FEED_IN),
                     Case(dev, CommandType.LIMIT_PRODUCTION_POWER, percentage=40)]
            try:
                yield World(
                    backend=backend, faults=sim.state.faults, results=Results(), cases=cases,
                    faulty=Case(dev, CommandType.LIMIT_PRODUCTION_POWER, percentage=30),
                    stranger=Entity(kind=EntityKind.PV, vendor="gridbox", backend="native-window", id="not-a-device"),
                    received=recorded(sim),
                )
            finally:
                await backend.aclose()

