"""Simulated devices that keep time windows themselves (see
:mod:`dercmd.protocols.native_window`), in front of the fleet's ``native-window`` entities:
each command is stored on the device at once and answered 201, which is its confirmation
(nothing comes later). A window limits the listed assets from ``startAt`` and lapses at
``endAt`` on its own: what the device reports follows it without anyone sending a revert.

A device refuses (409) a command for an asset it does not have, or a window already over. It
says which commands it stored (``commands:status``: SUCCEEDED, or UNKNOWN). The per-device
fault plans (:mod:`..faults`) apply as to the vendor cloud, but for ``lose_callback``: the
answer is the confirmation, there is nothing later to lose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from fastapi import Request, Response

from dercmd.events import utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.native_window import NativeBatch, NativeBatchAnswer, NativeWindowSettings

from ..backend import SimBackend
from ..faults import Faults
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
        self.serve_commands(NativeBatchAnswer, "Send up to 100 commands, windows included (body: NativeBatch)",
                            "Which of up to 1000 commands a device stored")

    async def commands_batch(self, request: Request) -> Response:
        call = await self.batch_call(request, NativeBatch)
        if isinstance(call, Response):
            return call
        now = utcnow()
        answers: list[dict[str, Any]] = []
        for command in call.batch.commands:
            taken = self.take(command, call.faulty)
            if isinstance(taken, dict):
                answers.append(taken)
                continue
            entity, _ = taken
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
        return await self.answer_batch(request, call, answers)

    def command_statuses(self, command_ids: Sequence[str]) -> list[str]:
        return ["SUCCEEDED" if c in self._stored else "UNKNOWN" for c in command_ids]


@simulates(BACKEND)
def _create(context: SimContext) -> NativeWindowSim:
    return NativeWindowSim(context.fleet, context.recorder, NativeWindowSettings().token, context.settings.sim_report_interval_s,
                           transport=context.transport, faults=context.faults)
