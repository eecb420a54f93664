"""The simulator's HTTP server: every simulated backend's API, plus ``/sim/...`` to read what
devices received and hold, and to inject faults."""

from __future__ import annotations

import gc
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Path, Query, Response

from dercmd import metrics as metrics_lib
from dercmd import web
from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.settings import SimulatorSettings

from . import backends  # noqa: F401  (every simulated backend registers itself on import)
from .devices import SimDevice
from .faults import FaultPlan, Faults
from .recorder import Recorder
from .registry import SimContext, Simulated, registered


def create_app(settings: SimulatorSettings, *, callback_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """``callback_transport`` replaces the network under what the simulator POSTs back:
    results, webhooks and reports (tests). Every registered simulated backend is built
    (:mod:`.registry`); each takes the credentials its dispatch backend presents from that
    protocol's settings (``DERCMD_VENDOR_CLOUD_TOKEN``, ``DERCMD_EV_AGGREGATOR_CLIENT_SECRET``, ...)."""
    fleet = Fleet.load(settings.fleet_file)
    recorder = Recorder()
    faults = Faults()
    context = SimContext(settings, fleet, recorder, faults, callback_transport)
    registrations = sorted(registered().values(), key=lambda r: r.name)
    simulated: dict[str, Simulated] = {r.name: r.create(context) for r in registrations}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc.freeze()  # the fleet lives as long as the process: no full GC passes over it
        for backend in simulated.values():
            started = backend.start()
            if inspect.isawaitable(started):
                await started
        yield
        for backend in simulated.values():
            await backend.aclose()

    app = FastAPI(title="dercmd simulator", lifespan=lifespan)
    web.install_error_envelope(app)
    app.state.recorder = recorder
    app.state.faults = faults
    app.state.simulated = simulated
    for registration in registrations:
        setattr(app.state, registration.state, simulated[registration.name])
        app.include_router(simulated[registration.name].router)

    @app.get("/sim/devices/{entityId}/received", tags=["sim"])
    async def received(entity_id: str = Path(alias="entityId")) -> Any:
        """Every command this device received, in order: ``commandId``, ``type``, ``value``
        (null when the type takes none), and where given ``percentage``, ``startAt``,
        ``endAt``, ``assets``, ``revertOf`` (a revert is an entry of its own), ``receivedAt``."""
        return {"entityId": entity_id, "commands": [r.to_json() for r in recorder.received(entity_id)]}

    @app.get("/sim/devices/{entityId}/state", tags=["sim"])
    async def state(entity_id: str = Path(alias="entityId")) -> Any:
        """What a measuring device would report now (the limits it holds show in it)."""
        for name, backend in simulated.items():
            if isinstance(device := backend.by_entity.get(entity_id), SimDevice):
                return {"entityId": entity_id, "backend": name, "measurements": device.measurements(utcnow())}
        raise HTTPException(404, f"no measuring device {entity_id}")

    @app.put("/sim/faults", tags=["sim"])
    async def put_faults(plan: FaultPlan) -> Any:
        """Inject faults into calls to the devices the plan names (all when it names none);
        see :mod:`dercmd.simulator.faults` for what each kind does."""
        faults.put(plan)
        return {"plans": [p.model_dump(by_alias=True) for p in faults.plans()]}

    @app.get("/sim/faults", tags=["sim"])
    async def get_faults() -> Any:
        return {"plans": [p.model_dump(by_alias=True) for p in faults.plans()]}

    @app.delete("/sim/faults", tags=["sim"], status_code=204)
    async def clear_faults() -> None:
        faults.clear()

    @app.get("/sim/received", tags=["sim"])
    async def totals() -> Any:
        return {"total": recorder.total}

    @app.get("/sim/receipts", tags=["sim"])
    async def receipts(after: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=10_000)) -> Any:
        """What every device received, in receive order, ``limit`` at a time: pass ``next``
        back as ``after`` to read on (``next == after`` when there is nothing new yet)."""
        page = recorder.since(after, limit)
        return {"receipts": [r.to_json() for r in page], "next": page[-1].seq if page else after}

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        body, content_type = metrics_lib.exposition()
        return Response(body, media_type=content_type)

    @app.get("/health", include_in_schema=False)
    async def _health() -> Any:
        return {"status": "ok", "service": "simulator"}

    return app
