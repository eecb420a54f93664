"""For tests only: write state the way another writer would, where the writer is not under
test (dispatch's claim marking a slot delivered, a gateway that held a charge point once).
Nothing in a service imports this module."""

from __future__ import annotations

import redis.asyncio as aioredis

from dercmd.events import CommandType

from . import keys, ocpp
from .ocpp import CommandState, OcppState


async def set_slot_fields(redis: aioredis.Redis, entity_id: str, **fields: str | int) -> None:
    """Set fields of the entity's slots hash (see :mod:`dercmd.state.slots` for them), e.g.
    ``delivered="c1"`` as dispatch's claim records it."""
    await redis.hset(keys.slots(entity_id), mapping=fields)  # type: ignore[arg-type]


async def set_ocpp_seen(redis: aioredis.Redis, entity_id: str, at: str) -> None:
    """The charge point connected once (at ``at``), as a gateway records it."""
    await OcppState(redis).mark_seen(entity_id, at)


async def set_ocpp_link(redis: aioredis.Redis, entity_id: str, url: str, conn_id: str) -> None:
    """A link as a gateway leaves it (with no expiry: one that died without letting go)."""
    await redis.hset(ocpp._link(entity_id), mapping={"url": url, "conn": conn_id})


async def set_ocpp_command(redis: aioredis.Redis, entity_id: str, command_id: str, type: CommandType,
                           state: CommandState) -> None:
    """A command record with only its type and state, as a gateway that sent it and went away."""
    await redis.hset(ocpp._command(entity_id, command_id), mapping={"type": type.value, "state": state.value})
