"""The EV aggregator against its simulator (one action per request, OAuth2, results by webhook
and by polling)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from fastapi import FastAPI

from dercmd.dispatch.backends.ev_aggregator import EvAggregatorBackend, EvAggregatorSettings
from dercmd.events import CommandType
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.launcher import free_port
from dercmd.protocols.ev_aggregator import EvAggregatorClient
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

from .base import BackendConformance, Case, Results, World, context, served

FLEET = {"entities": {"ev-c": {"kind": "EV", "vendor": "bmw", "backend": "ev-aggregator", "vendorDeviceId": "WBA-C"}}}


class TestEvAggregatorConformance(BackendConformance):
    @pytest.fixture
    async def world(self, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
        monkeypatch.setenv("DERCMD_EV_AGGREGATOR_CLIENT_ID", "conformance")
        monkeypatch.setenv("DERCMD_EV_AGGREGATOR_CLIENT_SECRET", "conformance-secret")
        # Polling is the backend's own way of making up a lost webhook (its integration tests
        # cover it); here it waits longer than any test, so that the suite sees the lost result
        # really lost and found by asking.
        monkeypatch.setenv("DERCMD_EV_AGGREGATOR_POLL_INTERVAL_S", "60")
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
        settings = Settings(fleet_file=str(tmp_path / "fleet.yaml"), sim_confirm_delay_ms=5, sim_report_interval_s=0,
                            sim_token_ttl_s=2, sim_modbus_port=free_port())
        fleet = Fleet.load(settings.fleet_file)
        sim = create_app(settings)
        results = Results()
        redis = aioredis.from_url(redis_url)
        callbacks = FastAPI()
        backend_settings = EvAggregatorSettings()
        async with served(sim) as sim_url, served(callbacks) as callback_url:
            client = EvAggregatorClient(f"{sim_url}/ev-aggregator", backend_settings.client_id, backend_settings.client_secret,
                                        timeout_s=1.0)
            backend = EvAggregatorBackend(client, context(settings, fleet, redis, callback_url, results), backend_settings)
            assert backend.router is not None
            callbacks.include_router(backend.router)
            await backend.start()
            ev = fleet.entities["ev-c"]
            try:
                yield World(
                    backend=backend, faults=sim.state.faults, results=results,
                    cases=[Case(ev, CommandType.START_CHARGING), Case(ev, CommandType.STOP_CHARGING)],
                    faulty=Case(ev, CommandType.START_CHARGING),
                    stranger=Entity(kind=EntityKind.EV, vendor="bmw", backend="ev-aggregator", id="not-onboarded"),
                    received=lambda entity_id: _received(sim, entity_id),
                )
            finally:
                await backend.aclose()
                await redis.aclose()


async def _received(sim: FastAPI, entity_id: str) -> list[str]:
    return [r.command_id for r in sim.state.recorder.received(entity_id)]
