"""The vendor cloud against its simulator (bulk REST, results by callback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from fastapi import FastAPI

from dercmd.dispatch.backends.vendor_cloud import VendorCloudBackend
from dercmd.events import CommandType
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.protocols.vendor_cloud import VendorCloudClient
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

from .base import BackendConformance, Case, Results, World, context, recorded, served

TOKEN = "conformance-vendor-token"
FLEET = {"entities": {"pv-c": {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"},
                      "ev-c": {"kind": "EV", "vendor": "tesla", "backend": "vendor-cloud"}}}


class TestVendorCloudConformance(BackendConformance):
    @pytest.fixture
    async def world(self, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
        monkeypatch.setenv("DERCMD_VENDOR_CLOUD_TOKEN", TOKEN)
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
        settings = Settings(fleet_file=str(tmp_path / "fleet.yaml"), sim_confirm_delay_ms=5, sim_report_interval_s=0)
        fleet = Fleet.load(settings.fleet_file)
        sim = create_app(settings)
        results = Results()
        redis = aioredis.from_url(redis_url)
        callbacks = FastAPI()
        async with served(sim) as sim_url, served(callbacks) as callback_url:
            client = VendorCloudClient(f"{sim_url}/vendor-cloud", TOKEN, timeout_s=1.0)
            backend = VendorCloudBackend(client, context(settings, fleet, redis, callback_url, results))
            callbacks.include_router(backend.router)
            await backend.start()
            pv, ev = fleet.entities["pv-c"], fleet.entities["ev-c"]
            cases = [Case(ev, CommandType.START_CHARGING), Case(ev, CommandType.STOP_CHARGING), Case(pv, CommandType.RESET),
                     Case(pv, CommandType.DISCONNECT), Case(pv, CommandType.LIMIT_FEED_IN, 3000), Case(pv, CommandType.STOP_FEED_IN),
                     Case(pv, CommandType.LIMIT_PRODUCTION_POWER, percentage=40)]
            try:
                yield World(
                    backend=backend, faults=sim.state.faults, results=results, cases=cases,
                    faulty=Case(pv, CommandType.LIMIT_FEED_IN, 2000),
                    stranger=Entity(kind=EntityKind.PV, vendor="sma", backend="vendor-cloud", id="not-in-the-cloud"),
                    received=recorded(sim),
                )
            finally:
                await backend.aclose()
                await redis.aclose()

