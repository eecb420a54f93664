"""What every simulated backend shares: its devices (the fleet's entities on that backend, the
measuring ones with a :class:`~.devices.SimDevice` each), bearer-token auth, a body read as its
wire model (a malformed one is a 400, as the protocols say), one HTTP client for what the
backend posts back, and the measurement-report endpoints of :mod:`dercmd.protocols.common`."""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar, TypeVar

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError

from dercmd.fleet import Entity, Fleet
from dercmd.protocols.common import DeviceReports, ReportRequest, ReportSubscription

from . import metrics
from .devices import SimDevice, measures
from .faults import Fault, FaultKind, Faults
from .recorder import Recorder
from .reports import Reporter

M = TypeVar("M", bound=BaseModel)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def drop_connection(request: Request) -> None:
    """Close the connection under ``request`` without answering (uvicorn's transport, reached
    through the ASGI ``receive`` it hands the app): the caller sees the server disconnect."""
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("cannot reach the connection's transport to drop it")
    transport.close()


def rate_limited(fault: Fault) -> Response:
    return Response(dumps({"message": "rate limited (fault injected)"}), status_code=429, media_type="application/json",
                    headers={"Retry-After": f"{fault.retry_after_s:g}"})


async def before_answering(request: Request, fault: Fault | None) -> Response | None:
    """Apply a whole-call fault after the device acted: late, never, or no answer at all (the
    response to return then is the one nobody will read)."""
    if fault is None:
        return None
    if fault.kind is FaultKind.LATENCY:
        await asyncio.sleep(fault.latency_s)
        return None
    if fault.kind is FaultKind.TIMEOUT_AFTER_ACT:
        await asyncio.sleep(fault.hang_s)
        return None
    if fault.kind is FaultKind.DROP_CONNECTION:
        drop_connection(request)
        return Response(status_code=500)
    return None


class SimBackend:
    name: ClassVar[str]

    def __init__(
        self, fleet: Fleet, recorder: Recorder, token: str, report_interval_s: float, *,
        transport: httpx.AsyncBaseTransport | None = None, faults: Faults | None = None,
    ) -> None:
        """``transport`` replaces the network under what the backend POSTs back (tests);
        ``faults``: the simulator's fault plans (:mod:`.faults`), which the backend applies."""
        self.devices: dict[str, Entity] = {e.device_id: e for e in fleet.entities.values() if e.backend == self.name}
        self.states: dict[str, SimDevice] = {d: SimDevice(e) for d, e in self.devices.items() if measures(e)}
        self.by_entity: dict[str, SimDevice] = {s.entity.id: s for s in self.states.values()}
        self.recorder = recorder
        self.faults = faults or Faults()
        self.received = metrics.RECEIVED.labels(self.name)
        self._authorization = f"Bearer {token}"
        self.http = httpx.AsyncClient(
            timeout=5.0, transport=transport, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )
        self.reporter = Reporter(self.name, self.states, report_interval_s, self.http)
        self.router = APIRouter(prefix=f"/{self.name}/v1", tags=[self.name])
        self.router.add_api_route(
            "/reports:subscription", self.subscribe_reports, methods=["PUT"], response_model=None, status_code=204,
            summary="Where periodic measurement reports go (body: ReportSubscription)",
        )
        self.router.add_api_route(
            "/reports:request", self.request_reports, methods=["POST"], response_model=None,
            responses={200: {"model": DeviceReports}}, summary="A measurement report now from each device (body: ReportRequest)",
        )

    async def start(self) -> None:
        """Nothing to start: the routes serve from the first request (a subclass may add to it)."""

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the backend's bearer token (a backend that issues
        tokens of its own checks those instead)."""
        return request.headers.get("authorization") == self._authorization

    async def read(self, request: Request, model: type[M]) -> M | Response:
        """The authenticated body as ``model``, or the error response (401, 400)."""
        if not self.authorized(request):
            return json_response({"message": "invalid token"}, 401)
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            return json_response({"message": f"malformed {model.__name__}: {str(exc)[:2000]}"}, 400)

    async def subscribe_reports(self, request: Request) -> Response:
        body = await self.read(request, ReportSubscription)
        if isinstance(body, Response):
            return body
        self.reporter.subscribe(body)
        return Response(status_code=204)

    async def request_reports(self, request: Request) -> Response:
        body = await self.read(request, ReportRequest)
        if isinstance(body, Response):
            return body
        return json_response({"reports": self.reporter.request(body.device_ids)})

    async def aclose(self) -> None:
        await self.reporter.aclose()
        await self.http.aclose()
