"""What every simulated backend shares: its devices (the fleet's entities on that backend, the
measuring ones with a :class:`~.devices.SimDevice` each), bearer-token auth, a body read as its
wire model (a malformed one is a 400, as the protocols say), one HTTP client for what the
backend posts back, and the measurement-report endpoints of :mod:`dercmd.protocols.common`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError

from dercmd.fleet import Entity, Fleet
from dercmd.protocols.common import DeviceReports, ReportRequest, ReportSubscription, StatusAnswer, StatusQuery

from . import metrics
from .devices import SimDevice, measures
from .faults import PER_COMMAND, Fault, FaultKind, Faults
from .recorder import Recorder
from .reports import Reporter

M = TypeVar("M", bound=BaseModel)


class _Addressed(Protocol):
    @property
    def command_id(self) -> str: ...

    @property
    def device_id(self) -> str: ...


B = TypeVar("B", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class BatchCall(Generic[B]):
    """A batch of commands that got past its call's checks: the body, the whole-call fault
    drawn for the devices it names (applied after they acted, :func:`before_answering`), and
    whether any fault plan is set (else no per-command draw is made)."""

    batch: B
    fault: Fault | None
    faulty: bool


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

    def serve_commands(self, answer: type[BaseModel], batch_summary: str, status_summary: str) -> None:
        """Serve a bulk protocol's two command routes (:mod:`dercmd.protocols.common`):
        ``commands:batch`` (``commands_batch``, answering ``answer``) and ``commands:status``
        (``commands_status``)."""
        self.router.add_api_route(
            "/commands:batch", self.commands_batch, methods=["POST"], response_model=None,
            responses={200: {"model": answer}, 400: {}, 401: {}}, summary=batch_summary,
            description=f"The {self.name} bulk endpoint; the protocol is described in `dercmd.protocols.{self.name.replace('-', '_')}`.",
        )
        self.router.add_api_route(
            "/commands:status", self.commands_status, methods=["POST"], response_model=None,
            responses={200: {"model": StatusAnswer}, 400: {}, 401: {}}, summary=status_summary,
        )

    async def commands_batch(self, request: Request) -> Response:
        raise NotImplementedError  # a bulk backend's (serve_commands)

    async def commands_status(self, request: Request) -> Response:
        query = await self.read(request, StatusQuery)
        if isinstance(query, Response):
            return query
        statuses = self.command_statuses(query.command_ids)
        return json_response({"results": [{"commandId": c, "status": s} for c, s in zip(query.command_ids, statuses, strict=True)]})

    def command_statuses(self, command_ids: Sequence[str]) -> list[str]:
        """What became of each command (SUCCEEDED, FAILED, PENDING, UNKNOWN): a bulk backend's."""
        raise NotImplementedError

    async def answer_batch(self, request: Request, call: BatchCall[Any], answers: list[dict[str, Any]]) -> Response:
        """The answer to a bulk call, one item a command, after the whole-call fault if any."""
        if (dropped := await before_answering(request, call.fault)) is not None:
            return dropped
        return json_response({"results": answers})

    async def batch_call(self, request: Request, model: type[B]) -> BatchCall[B] | Response:
        """A bulk call's start: the authenticated batch and its whole-call fault, or the
        response that ends the call (401, 400, or a 429 injected)."""
        batch = await self.read(request, model)
        if isinstance(batch, Response):
            return batch
        commands: Sequence[_Addressed] = batch.commands  # type: ignore[attr-defined]
        faulty = self.faults.active
        call_fault = self.faults.draw_call([e.id for c in commands if (e := self.devices.get(c.device_id))]) if faulty else None
        if call_fault is not None and call_fault.kind is FaultKind.RATE_LIMITED:
            return rate_limited(call_fault)
        return BatchCall(batch, call_fault, faulty)

    def take(self, command: _Addressed, faulty: bool) -> tuple[Entity, Fault | None] | dict[str, Any]:
        """One command of a batch: its device and the fault drawn for it, or the command's
        answer where it ends before reaching the device (404 unknown, 503 injected)."""
        entity = self.devices.get(command.device_id)
        if entity is None:
            return {"commandId": command.command_id, "status": 404, "message": f"unknown device {command.device_id}"}
        fault = self.faults.draw(entity.id, PER_COMMAND) if faulty else None
        if fault is not None and fault.kind is FaultKind.ERROR_5XX:
            return {"commandId": command.command_id, "status": 503, "message": "device unreachable (fault injected)"}
        return entity, fault

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
