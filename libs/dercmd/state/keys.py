"""Redis key names shared by more than one module of this package, and the two constants
every Redis caller uses. Every key of one entity carries the entity id as its hash tag
(``{entity}``), so a script touching several keys of one entity works on Redis Cluster.

Private to :mod:`dercmd.state`: outside it only ``CALL_TIMEOUT_S`` and ``STATE_TTL_S`` may be
imported (``tests/unit/test_state_ownership.py`` checks). Keys of one kind of state only are
built in its module (:mod:`.due`, :mod:`.rates`, :mod:`.ev_pending`, :mod:`.ocpp`)."""

from __future__ import annotations


#: Longest one Redis call (a whole pipeline counts as one) may take before it counts as a
#: failed dependency. Clients are made without a per-reply socket timeout, which would cost
#: an asyncio timeout per pipelined reply; callers bound each call with this instead.
CALL_TIMEOUT_S = 5.0

#: How long a command's decision and delivery state are kept: a redelivery older than this
#: would be treated as new.
STATE_TTL_S = 7 * 24 * 3600


def slots(entity_id: str) -> str:
    """Hash: the entity's slots (every field in :mod:`dercmd.state.slots`)."""
    return f"dercmd:{{{entity_id}}}:slots"


def decision(entity_id: str, command_id: str) -> str:
    """String: arbitration's recorded decision for one command (see :mod:`dercmd.state.slots`)."""
    return f"dercmd:{{{entity_id}}}:decision:{command_id}"


def delivery(entity_id: str, command_id: str) -> str:
    """String: dispatch's delivery state for one command (at-most-once delivery)."""
    return f"dercmd:{{{entity_id}}}:delivery:{command_id}"
