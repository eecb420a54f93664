"""A simulated vendor cloud (see :mod:`dercmd.protocols.vendor_cloud`) in front of the fleet's
``vendor-cloud`` devices: it checks the token, accepts, records what each device received,
and reports the device's result to the caller's ``responseUrl`` a moment later."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import httpx
from fastapi import APIRouter, Header, Path
from fastapi.responses import JSONResponse

from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.vendor_cloud import VendorAccepted, VendorCommand, VendorResult

from . import metrics
from .recorder import Recorder

log = logging.getLogger(__name__)

BACKEND = "vendor-cloud"


class VendorCloudSim:
    def __init__(self, fleet: Fleet, recorder: Recorder, token: str, confirm_delay_s: float) -> None:
        self._devices = {e.device_id: e for e in fleet.entities.values() if e.backend == BACKEND}
        self._recorder = recorder
        self._token = token
        self._confirm_delay_s = confirm_delay_s
        self._http = httpx.AsyncClient(timeout=5.0)
        self._tasks: set[asyncio.Task[None]] = set()
        self.router = APIRouter(prefix="/vendor-cloud/v1", tags=["vendor-cloud"])
        self.router.add_api_route("/devices/{deviceId}/commands", self.command, methods=["POST"], status_code=202)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._http.aclose()

    async def command(
        self,
        body: VendorCommand,
        device_id: str = Path(alias="deviceId"),
        authorization: str = Header(""),
    ) -> Any:
        if authorization != f"Bearer {self._token}":
            return JSONResponse({"error": "invalid token"}, status_code=401)
        entity = self._devices.get(device_id)
        if entity is None:
            return JSONResponse({"error": f"unknown device {device_id}"}, status_code=404)
        request_id = str(uuid.uuid4())
        self._recorder.record(entity.id, BACKEND, body.command_id, body.type, body.value, utcnow())
        metrics.RECEIVED.labels(BACKEND).inc()
        result = VendorResult(request_id=request_id, command_id=body.command_id, device_id=device_id, result="SUCCEEDED")
        task = asyncio.create_task(self._report(body.response_url, result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return VendorAccepted(request_id=request_id).model_dump(by_alias=True)

    async def _report(self, url: str, result: VendorResult) -> None:
        await asyncio.sleep(self._confirm_delay_s)  # the device carrying the command out
        try:
            response = await self._http.post(url, json=result.model_dump(by_alias=True, exclude_none=True))
            response.raise_for_status()
        except httpx.HTTPError as exc:
            metrics.CALLBACK_ERRORS.inc()
            log.warning("result not delivered", extra={"command_id": result.command_id, "url": url, "error": repr(exc)})
