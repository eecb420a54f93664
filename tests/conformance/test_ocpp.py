"""OCPP 1.6J against simulated charge points: the gateway served by uvicorn, the charge points
connected to it over real WebSockets, the backend calling the gateway over HTTP, the results
of transaction messages posted to the backend's callback route."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from dercmd.dispatch.backends.ocpp import OcppBackend, OcppSettings
from dercmd.events import CommandType
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.launcher import free_port
from dercmd.ocpp_gateway.app import add_routes
from dercmd.ocpp_gateway.gateway import Gateway
from dercmd.settings import Settings
from dercmd.simulator.faults import Faults
from dercmd.simulator.backends.ocpp import OcppChargePoints
from dercmd.simulator.recorder import Recorder

from .base import BackendConformance, Case, Results, World, context, served

CALLBACKS = "http://dispatch.conformance"
FLEET = Fleet.model_validate({"entities": {
    "cp-c": {"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": ["StartCharging", "StopCharging"]},
    "cp-f": {"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": ["StartCharging", "StopCharging"]},
}})


class TestOcppConformance(BackendConformance):
    @pytest.fixture
    async def world(self, redis_url: str) -> AsyncIterator[World]:
        port = free_port()
        settings = Settings(ocpp_gateway_port=port)
        ocpp = OcppSettings(call_timeout_s=1.0, heartbeat_interval_s=5)
        redis = aioredis.from_url(redis_url)
        results = Results()
        recorder, faults = Recorder(), Faults(random.Random(11))
        backend = OcppBackend(context(settings, FLEET, redis, CALLBACKS, results), ocpp)
        dispatch = FastAPI()
        assert backend.router is not None
        dispatch.include_router(backend.router)
        gateway = Gateway(settings, ocpp, redis, FLEET, transport=httpx.ASGITransport(app=dispatch))
        app = FastAPI()
        add_routes(app, gateway)
        charge_points = OcppChargePoints(FLEET, recorder, faults, f"ws://127.0.0.1:{port}/ocpp", 0.005, redis=redis)
        async with served(app, port):
            charge_points.start()
            try:
                await asyncio.wait_for(charge_points.connected(), 10)
                async with asyncio.timeout(10):  # and each declared its profiles
                    while any(c.profiles is None for c in gateway.connections.values()) or len(gateway.connections) < 2:
                        await asyncio.sleep(0.02)
                cp, faulty = FLEET.entities["cp-c"], FLEET.entities["cp-f"]
                yield World(
                    backend=backend, faults=faults, results=results,
                    cases=[Case(cp, CommandType.START_CHARGING), Case(cp, CommandType.STOP_CHARGING)],
                    faulty=Case(faulty, CommandType.START_CHARGING),
                    stranger=Entity(kind=EntityKind.CP, vendor="abb", backend="ocpp", id="never-connected"),
                    received=lambda entity_id: _received(recorder, entity_id),
                )
            finally:
                await charge_points.aclose()
                await gateway.aclose()
                await backend.aclose()
                await redis.aclose()


async def _received(recorder: Recorder, entity_id: str) -> list[str]:
    return [r.command_id for r in recorder.received(entity_id)]
