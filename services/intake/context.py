"""What every router of the API shares: the fleet, admission, the ledger, and who the caller is."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from aiokafka.errors import KafkaError
from fastapi import Path
from fastapi.security import HTTPBearer
from starlette.requests import HTTPConnection

from pydantic import Field

from dercmd.events import CommandAcceptedV1, CommandRequestV1, CommandStateV1, Model
from dercmd.fleet import Entity, Fleet, Role
from dercmd.ledger import Ledger
from dercmd.web import ErrorBody

from .admission import Admission, Refusal
from .idempotency import Idempotency

#: The longest an entity id may be (a request's ``entityId``, the ledger's column).
MAX_ENTITY_ID: int = next(m.max_length for m in CommandRequestV1.model_fields["entity_id"].metadata if hasattr(m, "max_length"))
#: The longest a command id may be (``ID_PATTERN``, the ledger's column).
MAX_COMMAND_ID = 64

#: Path parameters: longer is a 400 ``identifier_too_long`` before anything else (web.KnownQueryRoute).
EntityId = Annotated[str, Path(alias="entityId", min_length=1, max_length=MAX_ENTITY_ID)]
CommandId = Annotated[str, Path(max_length=MAX_COMMAND_ID)]

#: The error answers every route may give, for the OpenAPI document (all in the one envelope).
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Not valid: `validation_error` (with `errors`), `invalid_json`, `invalid_idempotency_key`, "
                                             "`identifier_too_long` (an id in the path longer than any id can be), "
                                             "or the key of the rule broken"},
    401: {"model": ErrorBody, "description": "`unauthorized`: no or unknown bearer token"},
    403: {"model": ErrorBody, "description": "`forbidden`: the token may read this entity but not command it"},
    404: {"model": ErrorBody, "description": "`entity_not_found`, `command_not_found`: does not exist, or this token may not see it"},
    409: {"model": ErrorBody, "description": "`cooldown_active` (with `cooldownUntil` and `Retry-After`), `command_finished`, "
                                             "`idempotency_key_in_use` (a request with this `Idempotency-Key` is still being answered; `Retry-After`)"},
    503: {"model": ErrorBody, "description": "`intake_unavailable`, `dependency_unavailable`: retry later"},
}


class Command(CommandStateV1):
    """A command's state, as every route answers it (fields without a value are left out)."""


class CancelRequested(Command):
    """``DELETE /v1/commands/{id}``'s answer: the command as it was, and the cancel on its way."""

    cancel: Literal["requested"]


class Scheduled(Model):
    commands: list[Command]


class CommandPage(Model):
    items: list[Command] = Field(description="newest first")
    page: int
    page_size: int
    has_more: bool


def command_json(state: CommandStateV1) -> dict[str, Any]:
    return state.model_dump(mode="json", by_alias=True, exclude_none=True)


def caller_of(token: str) -> str:
    """Who a token is, for the audit trail, without writing the secret down."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class FleetBearer(HTTPBearer):
    """The FastAPI dependency for the caller's bearer token: one of the fleet's, or a 401.
    The OpenAPI document shows it as the HTTP bearer scheme. One dependency, not a token check
    depending on ``HTTPBearer``: FastAPI's per-request cost is per dependency solved."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer")
        self._fleet = fleet

    async def __call__(self, request: HTTPConnection) -> str:  # type: ignore[override]
        credentials = await super().__call__(request)
        if credentials is None or not self._fleet.knows_token(credentials.credentials):
            raise Refusal("unauthorized", "a valid bearer token is required", status=401, headers={"WWW-Authenticate": "Bearer"})
        return credentials.credentials


@dataclass
class Intake:
    fleet: Fleet
    admission: Admission
    ledger: Ledger
    #: ``Idempotency-Key`` on every POST (:mod:`.idempotency`).
    idempotency: Idempotency
    #: ``Depends(intake.token)``: the caller's bearer token.
    token: FleetBearer = field(init=False)

    def __post_init__(self) -> None:
        self.token = FleetBearer(self.fleet)

    def authorise(self, token: str, entity_id: str, needed: Role, *, unknown: Refusal | None = None) -> Entity:
        """The entity, if the token holds ``needed`` on it. 404 whether it does not exist or
        may not be seen, so a caller never learns which; ``unknown`` replaces that 404 for an
        entity the token could see if it existed (the batch API's ``unknown_device_hash_id``)."""
        entity = self.fleet.entity(entity_id)
        role = self.fleet.role(token, entity_id)
        if role is None or (entity is None and unknown is None):
            raise Refusal("entity_not_found", f"no entity {entity_id}", status=404)
        if entity is None:
            raise unknown  # type: ignore[misc]
        if not role.allows(needed):
            raise Refusal("forbidden", f"{role} may not send commands to {entity_id}", status=403)
        return entity

    async def command(self, token: str, command_id: str) -> CommandStateV1:
        """A command this token may see; 404 whether it does not exist or may not be seen."""
        state = await asyncio.to_thread(self.ledger.get, command_id)
        if state is None or self.fleet.role(token, state.entity_id) is None:
            raise Refusal("command_not_found", f"no command {command_id}", status=404)
        return state

    async def admit(self, cmds: list[CommandAcceptedV1]) -> list[CommandStateV1]:
        """Admit commands of one request together (they join one group commit): all of them,
        or a :class:`Refusal` for the request. When the broker did not confirm, each command
        arbitration has not seen is aborted (Failed: ``intake_unavailable``); if that was all
        of them, the caller gets a 503 and may retry."""
        results = await asyncio.gather(*(self.admission.admit(cmd) for cmd in cmds), return_exceptions=True)
        failed: list[tuple[CommandAcceptedV1, KafkaError]] = []
        for cmd, result in zip(cmds, results, strict=True):
            if isinstance(result, KafkaError):
                failed.append((cmd, result))
            elif isinstance(result, BaseException):
                raise result  # a Refusal, or a failed dependency (503)
        aborted = [await self.admission.abort(cmd, repr(exc)) for cmd, exc in failed]
        if failed and all(aborted):
            raise Refusal("intake_unavailable", "the command could not be queued; retry later", status=503)
        if not failed:
            return list(results)  # type: ignore[arg-type]
        # Some were live after all: the caller gets them all, as the ledger has them now.
        states = await asyncio.to_thread(self.ledger.get_many, [c.id for c in cmds])
        return [states[c.id] for c in cmds]
