"""The simulator's HTTP server: every simulated backend's API, plus ``/sim/...`` to read what
devices received and hold, and to inject faults."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from dercmd import metrics as metrics_lib
from dercmd import web
from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.ev_aggregator import EvAggregatorSettings
from dercmd.protocols.native_window import NativeWindowSettings
from dercmd.protocols.ocpp import OcppSettings
from dercmd.protocols.vendor_cloud import VendorCloudSettings
from dercmd.settings import Settings

from .backend import SimBackend
from .ev_aggregator import EvAggregatorSim
from .faults import FaultPlan, Faults
from .native_window import NativeWindowSim
from .ocpp import OcppChargePoints, gateway_ws_url
from .recorder import Recorder
from .sunspec import SunSpecSim
from .vendor_cloud import VendorCloudSim


class FaultsBody(BaseModel):
    """``PUT /sim/vendor-cloud/faults``: what to change; a field left out stays as it is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    hold_results: bool | None = None
    lose_results: bool | None = None


def create_app(settings: Settings, *, callback_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """``callback_transport`` replaces the network under what the simulator POSTs back:
    results, webhooks and reports (tests). Each simulated backend takes the credentials its
    dispatch backend presents from that backend's settings (``DERCMD_VENDOR_CLOUD_TOKEN``,
    ``DERCMD_EV_AGGREGATOR_CLIENT_SECRET``, ...)."""
    fleet = Fleet.load(settings.fleet_file)
    recorder = Recorder()
    faults = Faults()
    interval_s = settings.sim_report_interval_s
    vendor_cloud = VendorCloudSim(
        fleet, recorder, VendorCloudSettings().token, settings.sim_confirm_delay_ms / 1000,
        report_interval_s=interval_s, callback_transport=callback_transport, faults=faults,
    )
    native_window = NativeWindowSim(fleet, recorder, NativeWindowSettings().token, interval_s, transport=callback_transport,
                                    faults=faults)
    sunspec = SunSpecSim(fleet, recorder, faults, settings.bind_host, settings.sim_modbus_port)
    charge_points = OcppChargePoints(fleet, recorder, faults, gateway_ws_url(settings, OcppSettings()), settings.sim_confirm_delay_ms / 1000)
    ev_settings = EvAggregatorSettings()
    ev_aggregator = EvAggregatorSim(
        fleet, recorder, ev_settings.client_id, ev_settings.client_secret, settings.sim_confirm_delay_ms / 1000,
        token_ttl_s=settings.sim_token_ttl_s, transport=callback_transport, faults=faults,
    )
    backends: tuple[SimBackend | SunSpecSim, ...] = (vendor_cloud, native_window, ev_aggregator, sunspec)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc.freeze()  # the fleet lives as long as the process: no full GC passes over it
        await sunspec.start()
        charge_points.start()
        yield
        await charge_points.aclose()
        for backend in backends:
            await backend.aclose()

    app = FastAPI(title="dercmd simulator", lifespan=lifespan)
    web.install_error_envelope(app)
    app.state.recorder = recorder
    app.state.faults = faults
    app.state.vendor_cloud = vendor_cloud
    app.state.native_window = native_window
    app.state.charge_points = charge_points
    app.state.sunspec = sunspec
    app.state.ev_aggregator = ev_aggregator
    for backend in backends:
        app.include_router(backend.router)

    @app.get("/sim/devices/{entityId}/received", tags=["sim"])
    async def received(entity_id: str = Path(alias="entityId")) -> Any:
        """Every command this device received, in order: ``commandId``, ``type``, ``value``
        (null when the type takes none), and where given ``percentage``, ``startAt``,
        ``endAt``, ``assets``, ``revertOf`` (a revert is an entry of its own), ``receivedAt``."""
        return {"entityId": entity_id, "commands": [r.to_json() for r in recorder.received(entity_id)]}

    @app.get("/sim/devices/{entityId}/state", tags=["sim"])
    async def state(entity_id: str = Path(alias="entityId")) -> Any:
        """What a measuring device would report now (the limits it holds show in it)."""
        for backend in backends:
            if (device := backend.by_entity.get(entity_id)) is not None:
                return {"entityId": entity_id, "backend": backend.name, "measurements": device.measurements(utcnow())}
        raise HTTPException(404, f"no measuring device {entity_id}")

    @app.put("/sim/vendor-cloud/faults", tags=["sim"])
    async def vendor_cloud_faults(body: FaultsBody) -> Any:
        """Hold the vendor cloud's results back (``commands:status`` says PENDING; setting it
        false again reports them at once) or lose them (decided, never POSTed)."""
        if body.lose_results is not None:
            vendor_cloud.results.lose_results = body.lose_results
        if body.hold_results is True:
            vendor_cloud.results.hold_results = True
        elif body.hold_results is False:
            vendor_cloud.release_results()
        return {"holdResults": vendor_cloud.results.hold_results, "loseResults": vendor_cloud.results.lose_results}

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
