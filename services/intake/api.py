"""The REST API (BRIEF 2.1). Every error is JSON ``{"key": ..., "message": ...}`` with a stable key."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
import sqlalchemy.exc
from aiokafka.errors import KafkaError
from fastapi import Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from dercmd import topics
from dercmd.events import CommandAcceptedV1, CommandFields, CommandStateV1, CommandStatus, new_id, utcnow
from dercmd.fleet import Entity, Fleet, Role
from dercmd.ledger import Ledger
from dercmd.service import Service
from dercmd.settings import Settings

from . import metrics
from .admission import Admission, Refusal
from .requests_consumer import RequestsHandler

log = logging.getLogger(__name__)


class CommandBody(CommandFields):
    """Body of ``POST /v1/entities/{entityId}/commands``."""


class Error(BaseModel):
    key: str
    message: str


def command_json(state: CommandStateV1) -> dict[str, Any]:
    return state.model_dump(mode="json", by_alias=True, exclude_none=True)


_bearer = HTTPBearer(auto_error=False)


def build(settings: Settings) -> Service:
    """The intake service: the REST API, and the consumer of the requests topic."""
    fleet = Fleet.load(settings.fleet_file)
    service = Service(
        "intake",
        settings,
        settings.api_port,
        title="dercmd",
        version="1",
        description="Commands to fleets of distributed energy resources. Errors are `{key, message}`.",
    )
    ledger = Ledger(settings.database_url)
    admission = Admission(fleet, ledger, service.publisher, service.redis, max_batch=settings.batch_max_records)
    requests = RequestsHandler(admission)
    service.starters.append(lambda: asyncio.to_thread(ledger.create_schema))
    service.closers.append(lambda: asyncio.to_thread(ledger.close))
    service.health_checks.append(lambda: asyncio.to_thread(ledger.ping))
    service.consume(topics.REQUESTS, requests, on_invalid=requests.on_invalid)
    app = service.app

    async def admission_of() -> Admission:
        return admission

    async def token_of(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
        if credentials is None or not fleet.knows_token(credentials.credentials):
            raise Refusal("unauthorized", "a valid bearer token is required", status=401,
                          headers={"WWW-Authenticate": "Bearer"})
        return credentials.credentials

    def authorise(token: str, entity_id: str, needed: Role) -> Entity:
        entity = fleet.entity(entity_id)
        role = fleet.role(token, entity_id)
        if entity is None or role is None:
            # The same answer whether it does not exist or may not be seen.
            raise Refusal("entity_not_found", f"no entity {entity_id}", status=404)
        if not role.allows(needed):
            raise Refusal("forbidden", f"{role} may not send commands to {entity_id}", status=403)
        return entity

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        metrics.REFUSED.labels("rest", exc.key).inc()
        return JSONResponse({"key": exc.key, "message": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(aioredis.ConnectionError)
    @app.exception_handler(aioredis.TimeoutError)
    @app.exception_handler(TimeoutError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _dependency(request: Request, exc: Exception) -> JSONResponse:
        metrics.REFUSED.labels("rest", "dependency_unavailable").inc()
        log.warning("dependency unavailable", extra={"error": repr(exc), "path": request.url.path})
        return JSONResponse({"key": "dependency_unavailable", "message": "a backing service is unavailable; retry later"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REFUSED.labels("rest", "validation_error").inc()
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return JSONResponse({"key": "validation_error", "message": "the request is not valid", "errors": errors}, status_code=400)

    errors = {s: {"model": Error} for s in (400, 401, 403, 404, 409, 503)}

    @app.post("/v1/entities/{entityId}/commands", status_code=201, responses=errors, tags=["commands"])
    async def create_command(
        body: CommandBody,
        entity_id: Annotated[str, Path(alias="entityId", max_length=128)],
        ignore_cooldown: Annotated[bool, Query(alias="ignoreCooldown")] = False,
        token: str = Depends(token_of),
        admission: Admission = Depends(admission_of),
    ) -> Any:
        """Send a command to one entity now. 201: accepted as ``Pending``."""
        entity = authorise(token, entity_id, Role.CONTRIBUTOR)
        admission.check(entity, body)
        cmd = CommandAcceptedV1(
            id=new_id(),
            entity_id=entity_id,
            type=body.type,
            value=body.value,
            ignore_cooldown=ignore_cooldown,
            accepted_at=utcnow(),
            source="rest",
        )
        try:
            state = await admission.admit(cmd)
        except KafkaError as exc:
            # In the ledger, but the broker did not confirm the announcement. Unless
            # arbitration already has it, make sure it never will, and say so truthfully.
            if await admission.abort(cmd, repr(exc)):
                raise Refusal("intake_unavailable", "the command could not be queued; retry later", status=503) from exc
            state = await asyncio.to_thread(admission.ledger.get, cmd.id)
        log.info("accepted", extra={"command_id": cmd.id, "entity_id": entity_id, "type": cmd.type.value, "source": "rest"})
        return JSONResponse(command_json(state), status_code=201, headers={"Location": f"/v1/commands/{cmd.id}"})

    @app.get("/v1/commands/{id}", responses=errors, tags=["commands"])
    async def get_command(
        id: str,
        token: str = Depends(token_of),
        admission: Admission = Depends(admission_of),
    ) -> Any:
        """A command's current state."""
        state = await asyncio.to_thread(admission.ledger.get, id)
        if state is None or fleet.role(token, state.entity_id) is None:
            raise Refusal("command_not_found", f"no command {id}", status=404)
        return command_json(state)

    @app.get("/v1/entities/{entityId}/commands", responses=errors, tags=["commands"])
    async def list_commands(
        entity_id: Annotated[str, Path(alias="entityId")],
        since: Annotated[datetime | None, Query(alias="from", description="created at or after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(alias="to", description="created before (ISO 8601)")] = None,
        status: CommandStatus | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
        page_size: Annotated[int, Query(alias="pageSize", ge=1, le=500)] = 50,
        token: str = Depends(token_of),
        admission: Admission = Depends(admission_of),
    ) -> Any:
        """An entity's commands, newest first, a page at a time."""
        authorise(token, entity_id, Role.VIEWER)
        for bound in (since, until):
            if bound is not None and bound.tzinfo is None:
                raise Refusal("validation_error", "from and to need a time zone (e.g. Z)")
        rows = await asyncio.to_thread(
            admission.ledger.list, entity_id, since=since, until=until, status=status,
            offset=(page - 1) * page_size, limit=page_size + 1,
        )
        return {
            "items": [command_json(r) for r in rows[:page_size]],
            "page": page,
            "pageSize": page_size,
            "hasMore": len(rows) > page_size,
        }

    return service
