"""The OCPP gateway's HTTP server: the charge points' WebSocket endpoint
(``/ocpp/{chargePointId}``) and the internal API dispatch calls (bearer-authenticated with
``DERCMD_OCPP_GATEWAY_TOKEN``), as a :class:`~dercmd.service.Service` with ``/metrics`` and
``/health``. It consumes no topic: what it learns goes to Redis and to dispatch's callback."""

from __future__ import annotations

import hmac
from typing import Any, TypeVar

from fastapi import FastAPI, Path, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from dercmd.fleet import Fleet
from dercmd.protocols.ocpp import COMMANDS_PATH, OUTCOMES_PATH, WS_PATH, GatewayCommand, GatewayOutcomesQuery, OcppSettings
from dercmd.service import Service
from dercmd.settings import OcppGatewaySettings, refuse_published

from .gateway import Gateway

M = TypeVar("M", bound=BaseModel)


def add_routes(app: FastAPI, gateway: Gateway) -> None:
    authorization = f"Bearer {gateway.ocpp.gateway_token}"

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", ""), authorization)

    async def read(request: Request, model: type[M], invalid: str) -> M | JSONResponse:
        """dispatch's call: its body as ``model``, or the error to answer (401, 400)."""
        if not authorized(request):
            return JSONResponse({"key": "unauthorized", "message": "not the gateway token"}, status_code=401)
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"key": invalid, "message": str(exc)[:2000]}, status_code=400)

    @app.websocket(WS_PATH + "/{charge_point_id}")
    async def charge_point(websocket: WebSocket, charge_point_id: str) -> None:
        await gateway.serve(websocket, charge_point_id)

    @app.post(COMMANDS_PATH.replace("{charge_point_id}", "{chargePointId}"), include_in_schema=False)
    async def command(request: Request, charge_point_id: str = Path(alias="chargePointId")) -> JSONResponse:
        body = await read(request, GatewayCommand, "invalid_command")
        if isinstance(body, JSONResponse):
            return body
        status, answer = await gateway.command(charge_point_id, body)
        return JSONResponse(answer.model_dump(by_alias=True, exclude_none=True), status_code=status)

    @app.post(OUTCOMES_PATH.replace("{charge_point_id}", "{chargePointId}"), include_in_schema=False)
    async def outcomes(request: Request, charge_point_id: str = Path(alias="chargePointId")) -> JSONResponse:
        body = await read(request, GatewayOutcomesQuery, "invalid_query")
        if isinstance(body, JSONResponse):
            return body
        status, answer = await gateway.read_back(charge_point_id, body.command_ids)
        return JSONResponse(answer.model_dump(by_alias=True, exclude_none=True), status_code=status)

    @app.get("/internal/v1/charge-points", include_in_schema=False)
    async def charge_points(request: Request) -> Any:
        """The charge points connected to this replica: booted, declared profiles, connectors."""
        if not authorized(request):
            return JSONResponse({"key": "unauthorized", "message": "not the gateway token"}, status_code=401)
        return {"gateway": gateway.url, "chargePoints": gateway.describe()}


def build(settings: OcppGatewaySettings) -> Service:
    service = Service("ocpp_gateway", settings, settings.ocpp_gateway_port)
    ocpp = OcppSettings()
    refuse_published(settings, ocpp)
    fleet = Fleet.load(settings.fleet_file)
    if settings.environment == "production":
        open_ = sorted(e.id for e in fleet.entities.values() if e.backend == "ocpp" and e.ocpp_password_hash is None)
        if open_:
            # Without a password, anyone who knows a charge point's id can take its place.
            raise SystemExit(f"dercmd: refusing to start: DERCMD_ENVIRONMENT=production, but these charge points need no "
                             f"password (ocppPasswordHash in the fleet file; `dercmd ocpp-password ID` makes one): "
                             f"{', '.join(open_[:20])}{' ...' if len(open_) > 20 else ''}")
    gateway = Gateway(settings, ocpp, service.redis, fleet)
    service.closers.append(gateway.aclose)
    add_routes(service.app, gateway)
    return service
