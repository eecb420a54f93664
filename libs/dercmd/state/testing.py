"""For tests only: write state the way another writer would, where the writer is not under
test (dispatch's claim marking a slot delivered, a gateway that held a charge point once).
Nothing in a service imports this module."""

from __future__ import annotations

import redis.asyncio as aioredis

from . import keys


async def set_slot_fields(redis: aioredis.Redis, entity_id: str, **fields: str | int) -> None:
    """Set fields of the entity's slots hash (see :mod:`dercmd.state.slots` for them), e.g.
    ``delivered="c1"`` as dispatch's claim records it."""
    await redis.hset(keys.slots(entity_id), mapping=fields)  # type: ignore[arg-type]
