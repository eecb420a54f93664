"""Simulated devices that keep time windows themselves (see
:mod:`dercmd.protocols.native_window`), in front of the fleet's ``native-window`` entities:
each command is stored on the device at once and answered 201, which is its confirmation
(nothing comes later). A window limits the listed assets from ``startAt`` and lapses at
``endAt`` on its own: what the device reports follows it without anyone sending a revert.

A device refuses (409) a command for an asset it does not have, or a window already over.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import Request, Response

from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.native_window import NativeBatch, NativeBatchAnswer

from .backend import SimBackend, json_response
from .faults import Faults
from .recorder import Recorder

BACKEND = "native-window"


class NativeWindowSim(SimBackend):
    name = BACKEND

    def __init__(
        self, fleet: Fleet, recorder: Recorder, token: str, report_interval_s: float, *,
        transport: httpx.AsyncBaseTransport | None = None, faults: Faults | None = None,
    ) -> None:
        super().__init__(fleet, recorder, token, report_interval_s, transport=transport, faults=faults)
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
        now = utcnow()
        answers: list[dict[str, Any]] = []
        for command in batch.commands:
            entity = self.devices.get(command.device_id)
            if entity is None:
                answers.append({"commandId": command.command_id, "status": 404, "message": f"unknown device {command.device_id}"})
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
            answers.append({"commandId": command.command_id, "status": 201})
        return json_response({"results": answers})
