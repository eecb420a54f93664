"""The simulator's HTTP server: every simulated backend's API, plus ``/sim/...`` to read what
devices received."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Path, Query, Response

from dercmd import metrics as metrics_lib
from dercmd.fleet import Fleet
from dercmd.settings import Settings

from .recorder import Recorder
from .vendor_cloud import VendorCloudSim


def create_app(settings: Settings, *, callback_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """``callback_transport`` replaces the network under the results the simulator POSTs back (tests)."""
    fleet = Fleet.load(settings.fleet_file)
    recorder = Recorder()
    vendor_cloud = VendorCloudSim(
        fleet, recorder, settings.vendor_cloud_token, settings.sim_confirm_delay_ms / 1000, callback_transport=callback_transport
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc.freeze()  # the fleet lives as long as the process: no full GC passes over it
        yield
        await vendor_cloud.aclose()

    app = FastAPI(title="dercmd simulator", lifespan=lifespan)
    app.state.recorder = recorder
    app.include_router(vendor_cloud.router)

    @app.get("/sim/devices/{entityId}/received", tags=["sim"])
    async def received(entity_id: str = Path(alias="entityId")) -> Any:
        """Every command this device received, in order."""
        return {"entityId": entity_id, "commands": [r.to_json() for r in recorder.received(entity_id)]}

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
