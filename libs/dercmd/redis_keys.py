"""Redis key names. Every key of one entity carries the entity id as its hash tag
(``{entity}``), so a script touching several keys of one entity works on Redis Cluster."""

from __future__ import annotations


#: Longest one Redis call (a whole pipeline counts as one) may take before it counts as a
#: failed dependency. Clients are made without a per-reply socket timeout, which would cost
#: an asyncio timeout per pipelined reply; callers bound each call with this instead.
CALL_TIMEOUT_S = 5.0

#: How long a command's decision and delivery state are kept: a redelivery older than this
#: would be treated as new.
STATE_TTL_S = 7 * 24 * 3600


def slots(entity_id: str) -> str:
    """Hash: ``fence``, ``active``, ``active_end``, ``scheduled``, ``scheduled_start``, ``cooldown_until``."""
    return f"dercmd:{{{entity_id}}}:slots"


def decision(entity_id: str, command_id: str) -> str:
    """String: arbitration's recorded decision for one command (makes redelivery a no-op).
    intake writes ``{"outcome": "aborted"}`` here first when it could not announce a command."""
    return f"dercmd:{{{entity_id}}}:decision:{command_id}"


def delivery(entity_id: str, command_id: str) -> str:
    """String: dispatch's delivery state for one command (at-most-once delivery)."""
    return f"dercmd:{{{entity_id}}}:delivery:{command_id}"
