"""Entity commands (BRIEF 2.1): one entity at a time, now or at a trigger time; and cancel."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator, Field

from dercmd import topics, web
from dercmd.events import (
    CommandCancelV1,
    CommandStatus,
    Model,
    PercentageCommand,
    PlainCommand,
    RequestTime,
    ValueCommand,
    utcnow,
)
from dercmd.fleet import Role

from .. import commands, idempotency
from ..admission import Refusal
from ..context import ERRORS, CancelRequested, Command, CommandId, EntityId, Intake, Scheduled, caller_of, command_json
from ..idempotency import IdempotencyKeyHeader

log = logging.getLogger(__name__)


class _Expires(Model):
    expires_at: RequestTime | None = Field(None, description="Not delivered by then: the command ends Failed (expired).")


class _Triggered(Model):
    trigger_time: RequestTime = Field(description="When the command is due (ISO 8601 with a time zone).")


class PlainCommandBody(PlainCommand, _Expires):
    """``POST /v1/entities/{entityId}/commands``: a type without value or percentage."""


class ValueCommandBody(ValueCommand, _Expires):
    """``POST /v1/entities/{entityId}/commands``: ``LimitFeedIn`` with its value in watts."""


class PercentageCommandBody(PercentageCommand, _Expires):
    """``POST /v1/entities/{entityId}/commands``: ``LimitProductionPower`` with its percentage."""


class PlainScheduledCommand(PlainCommand, _Triggered):
    """An item of ``POST /v1/entities/{entityId}/commands/schedule``: a type without value or percentage."""


class ValueScheduledCommand(ValueCommand, _Triggered):
    """An item of ``POST /v1/entities/{entityId}/commands/schedule``: ``LimitFeedIn`` with its value."""


class PercentageScheduledCommand(PercentageCommand, _Triggered):
    """An item of ``POST /v1/entities/{entityId}/commands/schedule``: ``LimitProductionPower`` with its percentage."""


#: Told apart by ``type``: the OpenAPI document says which types take ``value`` or ``percentage``.
CommandBody = Annotated[PlainCommandBody | ValueCommandBody | PercentageCommandBody, Field(discriminator="type")]
ScheduledCommand = Annotated[PlainScheduledCommand | ValueScheduledCommand | PercentageScheduledCommand,
                             Field(discriminator="type")]


def _true_or_false(value: Any) -> Any:
    """``true`` or ``false`` only (lax pydantic would also take 1, yes, on, t, ...)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError("must be true or false")
        return value.lower() == "true"
    return value


IgnoreCooldown = Annotated[bool, Query(alias="ignoreCooldown", description="true: bypass the cooldown (audited)"),
                           BeforeValidator(_true_or_false)]


def router(intake: Intake) -> APIRouter:
    api = APIRouter(tags=["entity commands"], responses=ERRORS, route_class=web.KnownQueryRoute)

    @api.post("/v1/entities/{entityId}/commands", status_code=201, response_model=Command, responses=idempotency.RESPONSES)
    async def create_command(request: Request, body: CommandBody, entity_id: EntityId, ignore_cooldown: IgnoreCooldown = False,
                             idempotency_key: IdempotencyKeyHeader = None, token: str = Depends(intake.token)) -> Any:
        """Send a command to one entity now. 201: accepted as ``Pending``."""

        async def create() -> JSONResponse:
            entity = intake.authorise(token, entity_id, Role.CONTRIBUTOR)
            cmd = commands.build(intake.fleet, entity, body.fields(), now=utcnow(), source="rest", expires_at=body.expires_at,
                                 ignore_cooldown=ignore_cooldown)
            (state,) = await intake.admit([cmd])
            log.info("accepted", extra={"command_id": cmd.id, "entity_id": entity_id, "type": cmd.type.value, "source": "rest"})
            return JSONResponse(command_json(state), status_code=201, headers={"Location": f"/v1/commands/{cmd.id}"})

        return await intake.idempotency.answer(request, token, idempotency_key, create)

    @api.post("/v1/entities/{entityId}/commands/schedule", status_code=201, response_model=Scheduled,
              responses=idempotency.RESPONSES)
    async def schedule_commands(request: Request, entity_id: EntityId,
                                body: Annotated[list[ScheduledCommand], Body(min_length=1, max_length=100)],
                                ignore_cooldown: IgnoreCooldown = False, idempotency_key: IdempotencyKeyHeader = None,
                                token: str = Depends(intake.token)) -> Any:
        """Commands for one entity at their trigger times (BRIEF 3: each one due later takes the
        scheduled slot, so a later item of the list supersedes an earlier one). All or none."""

        async def schedule() -> JSONResponse:
            entity = intake.authorise(token, entity_id, Role.CONTRIBUTOR)
            now = utcnow()
            cmds = [commands.build(intake.fleet, entity, item.fields(), now=now, source="rest", start_at=item.trigger_time,
                                   ignore_cooldown=ignore_cooldown) for item in body]
            states = await intake.admit(cmds)
            for cmd in cmds:
                log.info("accepted", extra={"command_id": cmd.id, "entity_id": entity_id, "type": cmd.type.value, "source": "rest",
                                            "trigger_time": cmd.trigger_time.isoformat() if cmd.trigger_time else None})
            return JSONResponse({"commands": [command_json(s) for s in states]}, status_code=201)

        return await intake.idempotency.answer(request, token, idempotency_key, schedule)

    @api.delete("/v1/commands/{id}", status_code=202, response_model=CancelRequested)
    async def cancel_command(id: CommandId, token: str = Depends(intake.token)) -> Any:
        """Cancel a command. One not yet delivered ends ``Canceled`` (reason ``canceled``); an
        active window already delivered ends now and the device is returned to its default.
        202: the cancel is on its way to arbitration, which decides it in order with the
        entity's other commands; read the command to see the outcome. 409 ``command_finished``
        for a command that has finished or been delivered (the device has it), a delivered
        window still active excepted."""
        state = await intake.command(token, id)
        # The command may be seen (GET answers it), so not a 404, even when its entity is not
        # (or no longer) in the fleet: a Rejected request for an unknown entity is a 409 below.
        role = intake.fleet.role(token, state.entity_id)
        if role is None or not role.allows(Role.CONTRIBUTOR):
            raise Refusal("forbidden", f"{role} may not cancel commands of {state.entity_id}", status=403)
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
