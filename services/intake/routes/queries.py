"""Reading commands: one by id, or an entity's, a page at a time."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from dercmd import web
from dercmd.events import CommandStatus, RequestTime
from dercmd.fleet import Role

from ..commands import check_aware
from ..context import ERRORS, Command, CommandId, CommandPage, EntityId, Intake, command_json


#: Pages beyond this are refused (400): the offset must stay a number every database takes.
MAX_PAGE = 1_000_000


def router(intake: Intake) -> APIRouter:
    api = APIRouter(tags=["queries"], responses=ERRORS, route_class=web.KnownQueryRoute)

    @api.get("/v1/commands/{id}", response_model=Command)
    async def get_command(id: CommandId, token: str = Depends(intake.token)) -> Any:
        """A command's current state."""
        state = await intake.command(token, id)
        return JSONResponse(command_json(state))

    @api.get("/v1/entities/{entityId}/commands", response_model=CommandPage)
    async def list_commands(
        entity_id: EntityId,
        since: Annotated[RequestTime | None, Query(alias="from", description="created at or after (ISO 8601)")] = None,
        until: Annotated[RequestTime | None, Query(alias="to", description="created before (ISO 8601)")] = None,
        status: CommandStatus | None = None,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
        page_size: Annotated[int, Query(alias="pageSize", ge=1, le=500)] = 50,
        token: str = Depends(intake.token),
    ) -> Any:
        """An entity's commands, newest first, a page at a time."""
        intake.authorise(token, entity_id, Role.VIEWER)
        check_aware(**{"from": since, "to": until})
        rows = await asyncio.to_thread(
            intake.ledger.list, entity_id, since=since, until=until, status=status,
            offset=(page - 1) * page_size, limit=page_size + 1,
        )
        return JSONResponse({"items": [command_json(r) for r in rows[:page_size]], "page": page, "pageSize": page_size,
                             "hasMore": len(rows) > page_size})

    return api
