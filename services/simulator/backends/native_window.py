"""Simulated devices that keep time windows themselves (see
:mod:`dercmd.protocols.native_window`), in front of the fleet's ``native-window`` entities:
each command is stored on the device at once and answered 201, which is its confirmation
(nothing comes later). A window limits the listed assets from ``startAt`` and lapses at
``endAt`` on its own: what the device reports follows it without anyone sending a revert.

A device refuses (409) a command for an asset it does not have, or a window already over. It
says which commands it stored (``commands:status``: SUCCEEDED, or UNKNOWN). The per-device
fault plans (:mod:`.faults`) apply as to the vendor cloud, but for ``lose_callback``: the
answer is the confirmation, there is nothing later to lose.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import Request, Response

from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.common import StatusAnswer, StatusQuery
from dercmd.protocols.native_window import NativeBatch, NativeBatchAnswer, NativeWindowSettings

from ..backend import SimBackend, before_answering, json_response, rate_limited
from ..faults import PER_COMMAND, FaultKind, Faults
from ..recorder import Recorder
from ..registry import SimContext, simulates

BACKEND = "native-window"


class NativeWindowSim(SimBackend):
    name = BACKEND

    def __init__(
        self, fleet: Fleet, recorder: Recorder, token: str, report_interval_s: float, *,
        transport: httpx.AsyncBaseTransport | None = None, faults: Faults | None = None,
    ) -> None:
        super().__init__(fleet, recorder, token, report_interval_s, transport=transport, faults=faults)
        self._stored: set[str] = set()
        self.router.add_api_route(
            "/commands:status", self.commands_status, methods=["POST"], response_model=None,
            responses={200: {"model": StatusAnswer}, 400: {}, 401: {}}, summary="Which of up to 1000 commands a device stored",
        )
        self.router.add_api_route(
            "/commands:batch",
            self.commands_batch,
            methods=["POST"],
            response_model=None,
            responses={200: {"model": NativeBatchAnswer}, 400: {}, 401: {}},
            summary="Send up to 100 commands, windows included (body: NativeBatch)",
            description="The native-window bulk endpoint; the protocol is described in `dercmd.protocols.native_window`.",
        )

    async def commands_batch(self, request: Request) -> Response:
        batch = await self.read(request, NativeBatch)
        if isinstance(batch, Response):
            return batch
        faulty = self.faults.active
        call_fault = self.faults.draw_call([e.id for c in batch.commands if (e := self.devices.get(c.device_id))]) if faulty else None
        if call_fault is not None and call_fault.kind is FaultKind.RATE_LIMITED:
            return rate_limited(call_fault)
        now = utcnow()
        answers: list[dict[str, Any]] = []
        for command in batch.commands:
            entity = self.devices.get(command.device_id)
            if entity is None:
                answers.append({"commandId": command.command_id, "status": 404, "message": f"unknown device {command.device_id}"})
                continue
            if faulty and (fault := self.faults.draw(entity.id, PER_COMMAND)) and fault.kind is FaultKind.ERROR_5XX:
                answers.append({"commandId": command.command_id, "status": 503, "message": "device unreachable (fault injected)"})
                continue
            state = self.states.get(command.device_id)
            if state is not None:
                refusal = state.refusal(command.asset_identifiers, command.end_at, now)
                if refusal:
                    answers.append({"commandId": command.command_id, "status": 409, "message": refusal})
                    continue
                state.apply(command.type, command.value, command.percentage, command.asset_identifiers,
                            command.start_at, command.end_at)
            self.recorder.record(
                entity.id, BACKEND, command.command_id, command.type, command.value, now, percentage=command.percentage,
                start_at=command.start_at, end_at=command.end_at, assets=command.asset_identifiers, revert_of=command.revert_of,
            )
            self.received.inc()
            self._stored.add(command.command_id)
            answers.append({"commandId": command.command_id, "status": 201})
        if (dropped := await before_answering(request, call_fault)) is not None:
            return dropped
        return json_response({"results": answers})

    async def commands_status(self, request: Request) -> Response:
        query = await self.read(request, StatusQuery)
        if isinstance(query, Response):
            return query
        return json_response({"results": [{"commandId": c, "status": "SUCCEEDED" if c in self._stored else "UNKNOWN"}
                                          for c in query.command_ids]})


@simulates(BACKEND)
def _create(context: SimContext) -> NativeWindowSim:
    return NativeWindowSim(context.fleet, context.recorder, NativeWindowSettings().token, context.settings.sim_report_interval_s,
                           transport=context.transport, faults=context.faults)
