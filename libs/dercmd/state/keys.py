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


# OCPP (the gateway writes, dispatch's ocpp backend reads): what the charge point's connection
# and transactions are, so any gateway or dispatch replica sees them.


def ocpp_link(entity_id: str) -> str:
    """Hash: the gateway replica holding the charge point's WebSocket (``url``, ``conn``: that
    connection's id). Expires unless the connection's heartbeats refresh it."""
    return f"dercmd:{{{entity_id}}}:ocpp:link"


def ocpp_seen(entity_id: str) -> str:
    """String: when the charge point first connected. One never seen is not known to the
    gateway (a command to it is refused); one seen and not connected now is offline."""
    return f"dercmd:{{{entity_id}}}:ocpp:seen"


def ocpp_transaction(entity_id: str) -> str:
    """Hash: the charge point's running transaction (``id``, ``idTag``); absent: none."""
    return f"dercmd:{{{entity_id}}}:ocpp:tx"


def ocpp_transaction_seq(entity_id: str) -> str:
    """String: the last transaction id the gateway gave this charge point."""
    return f"dercmd:{{{entity_id}}}:ocpp:txseq"


def ocpp_command(entity_id: str, command_id: str) -> str:
    """Hash: one command sent to the charge point: ``type``, ``idTag``, ``token``,
    ``resultUrl``, ``state``, ``txId``. ``state``: sending (the call left; after a call with
    no answer it stays so), accepted, rejected, succeeded (its transaction message came, or
    the charge point was read back), unsent or call_error (it did not act)."""
    return f"dercmd:{{{entity_id}}}:ocpp:cmd:{command_id}"


def ocpp_tag(entity_id: str, id_tag: str) -> str:
    """String: the StartCharging command an idTag was derived from."""
    return f"dercmd:{{{entity_id}}}:ocpp:tag:{id_tag}"


def ocpp_stop(entity_id: str, transaction_id: int | str) -> str:
    """String: the StopCharging command that asked to stop a transaction."""
    return f"dercmd:{{{entity_id}}}:ocpp:stop:{transaction_id}"
