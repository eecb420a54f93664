"""Entity commands (BRIEF 2.1): one entity at a time, now or at a trigger time; and cancel."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import Field

from dercmd import topics
from dercmd.events import CommandCancelV1, CommandFields, CommandStatus, Model, utcnow
from dercmd.fleet import Role

from .. import commands
from ..admission import Refusal
from ..context import ERRORS, Intake, caller_of, command_json

log = logging.getLogger(__name__)


class CommandBody(CommandFields):
    """Body of ``POST /v1/entities/{entityId}/commands``."""

    expires_at: datetime | None = Field(None, description="Not delivered by then: the command ends Failed (expired).")


class ScheduledCommand(CommandFields):
    """One item of ``POST /v1/entities/{entityId}/commands/schedule``."""

    trigger_time: datetime


class Scheduled(Model):
    commands: list[dict[str, Any]]


EntityId = Annotated[str, Path(alias="entityId", max_length=128)]
IgnoreCooldown = Annotated[bool, Query(alias="ignoreCooldown")]


def router(intake: Intake) -> APIRouter:
    api = APIRouter(tags=["entity commands"], responses=ERRORS)

    @api.post("/v1/entities/{entityId}/commands", status_code=201)
    async def create_command(body: CommandBody, entity_id: EntityId, ignore_cooldown: IgnoreCooldown = False,
                             token: str = Depends(intake.token)) -> Any:
        """Send a command to one entity now. 201: accepted as ``Pending``."""
        entity = intake.authorise(token, entity_id, Role.CONTRIBUTOR)
        cmd = commands.build(intake.fleet, entity, body, now=utcnow(), source="rest", expires_at=body.expires_at,
                             ignore_cooldown=ignore_cooldown)
        (state,) = await intake.admit([cmd])
        log.info("accepted", extra={"command_id": cmd.id, "entity_id": entity_id, "type": cmd.type.value, "source": "rest"})
        return JSONResponse(command_json(state), status_code=201, headers={"Location": f"/v1/commands/{cmd.id}"})

    @api.post("/v1/entities/{entityId}/commands/schedule", status_code=201, response_model=Scheduled)
    async def schedule_commands(entity_id: EntityId,
                                body: Annotated[list[ScheduledCommand], Body(min_length=1, max_length=100)],
                                ignore_cooldown: IgnoreCooldown = False, token: str = Depends(intake.token)) -> Any:
        """Commands for one entity at their trigger times (BRIEF 3: each one due later takes the
        scheduled slot, so a later item of the list supersedes an earlier one). All or none."""
        entity = intake.authorise(token, entity_id, Role.CONTRIBUTOR)
        now = utcnow()
        cmds = [commands.build(intake.fleet, entity, item, now=now, source="rest", start_at=item.trigger_time,
                               ignore_cooldown=ignore_cooldown) for item in body]
        states = await intake.admit(cmds)
        for cmd in cmds:
            log.info("accepted", extra={"command_id": cmd.id, "entity_id": entity_id, "type": cmd.type.value, "source": "rest",
                                        "trigger_time": cmd.trigger_time.isoformat() if cmd.trigger_time else None})
        return JSONResponse({"commands": [command_json(s) for s in states]}, status_code=201)

    @api.delete("/v1/commands/{id}", status_code=202)
    async def cancel_command(id: str, token: str = Depends(intake.token)) -> Any:
        """Cancel a command. One not yet delivered ends ``Canceled`` (reason ``canceled``); an
        active window already delivered ends now and the device is returned to its default.
        202: the cancel is on its way to arbitration, which decides it in order with the
        entity's other commands; read the command to see the outcome. 409 ``command_finished``
        for a command that has finished or been delivered (the device has it), a delivered
        window still active excepted."""
        state = await intake.command(token, id)
        intake.authorise(token, state.entity_id, Role.CONTRIBUTOR)
        now = utcnow()
        active_window = state.end_at is not None and state.end_at > now and state.reason is None
        delivered = state.status is CommandStatus.SENT or state.status.terminal
        if state.revert_of is not None or (delivered and not active_window):
            raise Refusal("command_finished", f"command {id} is {state.status.value}: there is nothing to cancel", status=409,
                          extra={"status": state.status.value})
        cancel = CommandCancelV1(command_id=id, entity_id=state.entity_id, reason="canceled", by=caller_of(token), at=now)
        await intake.admission.publisher.publish_all([(topics.ACCEPTED, cancel, state.entity_id)])
        log.info("cancel requested", extra={"command_id": id, "entity_id": state.entity_id, "by": cancel.by})
        return JSONResponse({**command_json(state), "cancel": "requested"}, status_code=202)

    return api
