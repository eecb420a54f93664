"""Reading commands: one by id, or an entity's, a page at a time."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from dercmd.events import CommandStatus
from dercmd.fleet import Role

from ..commands import check_aware
from ..context import ERRORS, Intake, command_json


def router(intake: Intake) -> APIRouter:
    api = APIRouter(tags=["queries"], responses=ERRORS)

    @api.get("/v1/commands/{id}")
    async def get_command(id: str, token: str = Depends(intake.token)) -> Any:
        """A command's current state."""
        state = await intake.command(token, id)
        return command_json(state)

    @api.get("/v1/entities/{entityId}/commands")
    async def list_commands(
        entity_id: Annotated[str, Path(alias="entityId")],
        since: Annotated[datetime | None, Query(alias="from", description="created at or after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(alias="to", description="created before (ISO 8601)")] = None,
        status: CommandStatus | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
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
        return {"items": [command_json(r) for r in rows[:page_size]], "page": page, "pageSize": page_size,
                "hasMore": len(rows) > page_size}

    return api
