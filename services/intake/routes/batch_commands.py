"""Device batch commands (BRIEF 2.2): one time-windowed curtailment for up to 100 devices.

Every check runs before anything is admitted, so a refusal (HTTP 400 with its ``key``)
refuses the whole request and nothing reaches any device. 201 means received by the
platform: each device's command is then arbitrated and delivered on its own.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from dercmd import web
from dercmd.events import CommandFields, CommandType, Model, RequestTime, utcnow
from dercmd.fleet import Role

from .. import commands, idempotency
from ..admission import Refusal
from ..context import ERRORS, Intake
from ..idempotency import IdempotencyKeyHeader

log = logging.getLogger(__name__)

MAX_DEVICES = 100


class BatchCommand(Model):
    type: Literal["limitProductionPower"]
    percentage: int = Field(ge=0, le=100, strict=True)
    start_at: RequestTime
    end_at: RequestTime
    asset_identifiers: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(None, max_length=100)


class BatchBody(Model):
    """Body of ``POST /v1/command/``."""

    command: BatchCommand
    device_hash_ids: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(min_length=1, max_length=MAX_DEVICES)

    @field_validator("device_hash_ids")
    @classmethod
    def _distinct(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            raise ValueError("deviceHashIds lists a device twice")
        return ids


class Created(Model):
    device_hash_id: str
    id: str


class BatchCreated(Model):
    commands: list[Created]


def router(intake: Intake) -> APIRouter:
    api = APIRouter(tags=["batch commands"], responses=ERRORS, route_class=web.KnownQueryRoute)

    @api.post("/v1/command/", status_code=201, response_model=BatchCreated, responses=idempotency.RESPONSES)
    async def create_batch(request: Request, body: BatchBody, idempotency_key: IdempotencyKeyHeader = None,
                           token: str = Depends(intake.token)) -> Any:
        """Limit the production of up to 100 devices to ``percentage`` from ``startAt`` to
        ``endAt`` (then they return to their default), for the listed assets only if
        ``assetIdentifiers`` is given. 201 answers each device's command id."""

        async def create() -> JSONResponse:
            now = utcnow()
            spec = body.command
            commands.check_window(now, spec.start_at, spec.end_at)
            entities = [
                intake.authorise(token, device_id, Role.CONTRIBUTOR,
                                 unknown=Refusal("unknown_device_hash_id", f"no device {device_id}"))
                for device_id in body.device_hash_ids
            ]
            fields = CommandFields(type=CommandType.LIMIT_PRODUCTION_POWER, percentage=spec.percentage)
            cmds = [commands.build(intake.fleet, entity, fields, now=now, source="rest", start_at=spec.start_at,
                                   end_at=spec.end_at, asset_identifiers=spec.asset_identifiers) for entity in entities]
            await intake.admit(cmds)
            log.info("batch accepted", extra={"devices": len(cmds), "percentage": spec.percentage,
                                              "start_at": spec.start_at.isoformat(), "end_at": spec.end_at.isoformat(),
                                              "command_id": cmds[0].id})
            return JSONResponse({"commands": [{"deviceHashId": c.entity_id, "id": c.id} for c in cmds]}, status_code=201)

        return await intake.idempotency.answer(request, token, idempotency_key, create)

    return api
