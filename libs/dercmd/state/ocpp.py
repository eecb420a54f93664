"""What the OCPP gateway knows of each charge point, in Redis so that any gateway replica and
any dispatch replica sees it after a reconnect elsewhere or a restart.

Keys (all of one charge point under its entity's hash tag):

``dercmd:{entity}:ocpp:link`` (hash; expires unless the connection's heartbeats refresh it)
    The gateway replica holding the charge point's WebSocket: ``url`` (where dispatch reaches
    that replica), ``conn`` (that connection's id). Written by the gateway
    (:meth:`OcppState.take_link`, ``ocpp_hold.lua``, ``ocpp_release.lua``); read by dispatch's
    ``ocpp`` backend (:meth:`OcppState.links`, :meth:`OcppState.gateway_url`,
    :meth:`OcppState.command_states`).
``dercmd:{entity}:ocpp:seen`` (string, no expiry)
    When the charge point first connected. One never seen is unknown to the gateway (a command
    to it is refused); one seen and not connected now is offline. Written by the gateway
    (:meth:`OcppState.mark_seen`), read by the ``ocpp`` backend (:meth:`OcppState.links`).
``dercmd:{entity}:ocpp:tx`` (hash, ``STATE_TTL_S``)
    The charge point's running transaction: ``id``, ``idTag``; absent: none. Gateway only.
``dercmd:{entity}:ocpp:txseq`` (string, no expiry)
    The last transaction id the gateway gave the charge point. Gateway only.
``dercmd:{entity}:ocpp:cmd:<command id>`` (hash, ``STATE_TTL_S``)
    One command sent to the charge point: ``type``, ``idTag``, ``token``, ``resultUrl``,
    ``state`` (:class:`CommandState`), ``txId``, ``msgId`` (the message id of its latest CALL:
    each call, a retry included, has a new one). Written by the gateway (``ocpp_advance.lua``,
    ``ocpp_confirm.lua``), read by the gateway and by the ``ocpp`` backend's outcome queries
    (:meth:`OcppState.command_states`).
``dercmd:{entity}:ocpp:tag:<idTag>`` (string, ``STATE_TTL_S``)
    The StartCharging command an idTag was derived from. Written by the gateway; read by the
    gateway and by the simulated charge points (:meth:`OcppState.command_of_tag`: a real
    charge point never needs it).
``dercmd:{entity}:ocpp:stop:<transaction id>`` (string, ``STATE_TTL_S``)
    The StopCharging command that asked to stop a transaction. Written by the gateway; read by
    the gateway and by the simulated charge points (:meth:`OcppState.command_of_stop`).

Every call here is bounded by ``CALL_TIMEOUT_S``; the round trips are the ones the gateway and
the backend made before this module existed (one pipeline per batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from dercmd.events import CommandType

from .keys import CALL_TIMEOUT_S, STATE_TTL_S
from .scripts import Script, source


def _link(entity_id: str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:link"


def _seen(entity_id: str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:seen"


def _transaction(entity_id: str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:tx"


def _transaction_seq(entity_id: str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:txseq"


def _command(entity_id: str, command_id: str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:cmd:{command_id}"


def _tag(entity_id: str, id_tag: str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:tag:{id_tag}"


def _stop(entity_id: str, transaction_id: int | str) -> str:
    return f"dercmd:{{{entity_id}}}:ocpp:stop:{transaction_id}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class CommandState(StrEnum):
    """Where a command sent to a charge point is."""

    SENDING = "sending"  # the call left; after a call with no answer it stays so
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    SUCCEEDED = "succeeded"  # its transaction message came, or the charge point was read back
    UNSENT = "unsent"  # it did not leave: the charge point did not act
    CALL_ERROR = "call_error"  # the charge point answered a CALLERROR: it did not act


def _state(value: bytes | str | None) -> CommandState | None:
    text = _text(value)
    return CommandState(text) if text else None


@dataclass(frozen=True, slots=True)
class Link:
    """Where dispatch reaches a charge point: its gateway's URL (None: connected to none) and
    whether it was ever seen."""

    url: str | None
    seen: bool


@dataclass(frozen=True, slots=True)
class LinkRecord:
    """The link as the gateway keeps it: its URL, the holding connection's id, its TTL (s)."""

    url: str | None
    conn: str | None
    ttl_s: int


@dataclass(frozen=True, slots=True)
class CommandRecord:
    type: CommandType | None
    state: CommandState | None
    id_tag: str | None = None
    token: str | None = None
    result_url: str | None = None
    transaction_id: int | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Transaction:
    id: int
    id_tag: str | None


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A command whose transaction message came: where to post its result, with its token."""

    token: str
    result_url: str


class OcppState:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._advance = Script(redis, source("ocpp_advance.lua"))
        self._confirm = Script(redis, source("ocpp_confirm.lua"))
        self._hold = Script(redis, source("ocpp_hold.lua"))
        self._release = Script(redis, source("ocpp_release.lua"))
        self._end_transaction = Script(redis, source("ocpp_end_transaction.lua"))

    # -- the gateway: connections ------------------------------------------------------------

    async def take_link(self, entity_id: str, url: str, conn_id: str, ttl_s: int) -> None:
        """This connection is the charge point's newest: it holds the link, whoever did before."""
        key = _link(entity_id)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key).hset(key, mapping={"url": url, "conn": conn_id}).expire(key, ttl_s)
                await pipe.execute()

    async def hold_link(self, entity_id: str, conn_id: str, url: str, ttl_s: int) -> bool:
        """Refresh the link's expiry for this connection; False if another connection holds it."""
        return bool(await self._hold.run([_link(entity_id)], [conn_id, url, ttl_s]))

    async def release_link(self, entity_id: str, conn_id: str) -> bool:
        """Let go of the link if this connection still holds it."""
        return bool(await self._release.run([_link(entity_id)], [conn_id]))

    async def mark_seen(self, entity_id: str, at: str) -> None:
        """The charge point connected (``at``: when, kept the first time only)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._redis.set(_seen(entity_id), at, nx=True)

    # -- the gateway: commands and transactions -------------------------------------------

    async def running_transaction(self, entity_id: str) -> int | None:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            running = await self._redis.hget(_transaction(entity_id), "id")
        return int(running) if running is not None else None

    async def record_command(self, entity_id: str, command_id: str, type: CommandType, id_tag: str, token: str,
                             result_url: str, transaction_id: int | None = None, message_id: str | None = None) -> None:
        """Before sending a command (the transaction message may come before, or instead of,
        the answer): its record in state ``sending``, what its transaction message is matched
        by (a start's idTag; a stop's ``transaction_id``), and the message id of the CALL about
        to leave (``message_id``)."""
        record = _command(entity_id, command_id)
        fields = {"type": type.value, "idTag": id_tag, "token": token, "resultUrl": result_url,
                  "state": CommandState.SENDING.value}
        if message_id is not None:
            fields["msgId"] = message_id
        if transaction_id is None:
            side = _tag(entity_id, id_tag)
        else:
            fields["txId"] = str(transaction_id)
            side = _stop(entity_id, transaction_id)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(record).hset(record, mapping=fields).expire(record, STATE_TTL_S)
                pipe.set(side, command_id, ex=STATE_TTL_S)
                await pipe.execute()

    async def advance(self, entity_id: str, command_id: str, before: CommandState, after: CommandState) -> bool:
        """Move the command from ``before`` to ``after``; False (and no change) if it is not in ``before``."""
        return bool(await self._advance.run([_command(entity_id, command_id)], [before.value, after.value]))

    async def commands(self, entity_id: str, command_ids: Sequence[str]) -> list[CommandRecord]:
        """The type and state of each of one charge point's commands (None for no record)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=False) as pipe:
                for command_id in command_ids:
                    pipe.hmget(_command(entity_id, command_id), "type", "state")
                replies = list(await pipe.execute())
        return [CommandRecord(CommandType(_text(t)) if t else None, _state(s)) for t, s in replies]

    async def start_transaction(self, entity_id: str, id_tag: str) -> tuple[int, str | None]:
        """A new transaction runs: its id, and the command whose idTag it carries (None: none)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(_transaction_seq(entity_id)).get(_tag(entity_id, id_tag))
                transaction_id, command_id = await pipe.execute()
            running = _transaction(entity_id)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(running).hset(running, mapping={"id": transaction_id, "idTag": id_tag}).expire(running, STATE_TTL_S)
                await pipe.execute()
        return int(transaction_id), _text(command_id)

    async def stop_transaction(self, entity_id: str, transaction_id: int) -> str | None:
        """The transaction ended (forgotten if it is still the running one): the command that
        asked to stop it (None: none)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            command_id = await self._redis.get(_stop(entity_id, transaction_id))
        await self._end_transaction.run([_transaction(entity_id)], [transaction_id])
        return _text(command_id)

    async def confirm(self, entity_id: str, command_id: str, transaction_id: int) -> Confirmed | None:
        """The command's transaction message came: it succeeded. None if there is no record of it."""
        found = await self._confirm.run([_command(entity_id, command_id)], [transaction_id])
        if not found:
            return None
        token, result_url = (_text(v) or "" for v in found)
        return Confirmed(token, result_url)

    # -- the simulated charge points -----------------------------------------------------

    async def command_of_tag(self, entity_id: str, id_tag: str) -> str | None:
        """The StartCharging command an idTag was derived from (None: none recorded). The
        simulator records what each charge point received under the command's id; a real
        charge point never needs to know it."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return _text(await self._redis.get(_tag(entity_id, id_tag)))

    async def command_of_stop(self, entity_id: str, transaction_id: int) -> str | None:
        """The StopCharging command that asked to stop a transaction (None: none recorded)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return _text(await self._redis.get(_stop(entity_id, transaction_id)))

    # -- dispatch's ocpp backend ----------------------------------------------------------

    async def links(self, entity_ids: Sequence[str]) -> list[Link]:
        """Each charge point's gateway and whether it was ever seen, one round trip for all."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=False) as pipe:
                for entity_id in entity_ids:
                    pipe.hget(_link(entity_id), "url").exists(_seen(entity_id))
                replies = await pipe.execute()
        return [Link(_text(url), bool(seen)) for url, seen in zip(replies[0::2], replies[1::2], strict=True)]

    async def gateway_url(self, entity_id: str) -> str | None:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return _text(await self._redis.hget(_link(entity_id), "url"))

    async def command_states(self, commands: Sequence[tuple[str, str]]) -> list[tuple[CommandState | None, str | None]]:
        """For each ``(entity id, command id)``: the command's state as the gateway recorded it
        (None: no record) and the URL of the gateway holding its charge point now, one round
        trip for all."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=False) as pipe:
                for entity_id, command_id in commands:
                    pipe.hget(_command(entity_id, command_id), "state")
                    pipe.hget(_link(entity_id), "url")
                replies = await pipe.execute()
        return [(_state(s), _text(u)) for s, u in zip(replies[0::2], replies[1::2], strict=True)]

    # -- readers (operations, tests) ------------------------------------------------------

    async def link(self, entity_id: str) -> LinkRecord:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with self._redis.pipeline(transaction=False) as pipe:
                url, conn, ttl = await pipe.hget(_link(entity_id), "url").hget(_link(entity_id), "conn").ttl(_link(entity_id)).execute()
        return LinkRecord(_text(url), _text(conn), int(ttl))

    async def transaction(self, entity_id: str) -> Transaction | None:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            raw = await self._redis.hgetall(_transaction(entity_id))
        return Transaction(int(raw[b"id"]), _text(raw.get(b"idTag"))) if raw else None

    async def command(self, entity_id: str, command_id: str) -> CommandRecord | None:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            raw = await self._redis.hgetall(_command(entity_id, command_id))
        if not raw:
            return None
        tx = raw.get(b"txId")
        return CommandRecord(CommandType(raw[b"type"].decode()) if raw.get(b"type") else None, _state(raw.get(b"state")),
                             _text(raw.get(b"idTag")), _text(raw.get(b"token")), _text(raw.get(b"resultUrl")),
                             int(tx) if tx else None, _text(raw.get(b"msgId")))
