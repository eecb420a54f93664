"""Idempotency keys of the REST API's POSTs (the IETF httpapi ``Idempotency-Key`` header):
what each (caller, key) was first used for and the answer it got, shared by every intake
replica (``idempotency.lua``, one round trip per call).

Key: ``dercmd:idempotency:{<scope>}:<sha256 of the key>`` (hash), ``scope`` the caller (its
token's hash), so two callers' keys never meet. Expires ``lease_ms`` after :meth:`begin` while
the request is in progress (a replica that died meanwhile frees the key then), ``ttl_ms``
after :meth:`IdempotencyKeys.finish` once answered.

    ========= ================================================== =====================
    field     what                                               written by
    ========= ================================================== =====================
    fp        the request's fingerprint (method, path, query,    begin
              body, as the caller computes it)
    owner     the id of the attempt that holds the key           begin
    status    the HTTP status it answered (absent: in progress)  finish
    body      the answer's body                                  finish
    headers   the answer's headers to replay (JSON object)       finish
    ========= ================================================== =====================

Written and read by intake only (``dercmd.intake.idempotency``, which keeps the policy: what
a fingerprint covers, which answers are kept). An error answer is not kept
(:meth:`IdempotencyKeys.release`): it created nothing, and the caller may retry with the key.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

import redis.asyncio as aioredis

from .scripts import Script, source

_SCRIPT = source("idempotency.lua")
#: How long a request may hold its key in progress before another may take it, ms.
LEASE_MS = 60_000


def _record_key(scope: str, key: str) -> str:
    return f"dercmd:idempotency:{{{scope}}}:{hashlib.sha256(key.encode()).hexdigest()}"


class Outcome(StrEnum):
    NEW = "new"  #: the key was free: this attempt holds it now
    DONE = "done"  #: the same request was answered: replay the answer
    IN_PROGRESS = "in_progress"  #: the same request is being answered now
    MISMATCH = "mismatch"  #: the key was used for another request


@dataclass(frozen=True)
class Answer:
    """An answer kept under a key, to replay."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Begun:
    outcome: Outcome
    #: The attempt's id (``NEW``): pass it to :meth:`IdempotencyKeys.finish` or ``release``.
    owner: str = ""
    #: The answer to replay (``DONE``).
    answer: Answer | None = None


class IdempotencyKeys:
    def __init__(self, redis: aioredis.Redis, ttl_s: float, lease_ms: int = LEASE_MS) -> None:
        self._script = Script(redis, _SCRIPT)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._lease_ms = lease_ms

    async def begin(self, scope: str, key: str, fingerprint: str) -> Begun:
        """Take ``key`` for a request with ``fingerprint``, or say what it holds."""
        owner = uuid.uuid4().hex
        reply = await self._script.run([_record_key(scope, key)], ("begin", fingerprint, owner, self._lease_ms))
        outcome = Outcome(reply[0].decode())
        if outcome is Outcome.NEW:
            return Begun(outcome, owner=owner)
        if outcome is Outcome.DONE:
            headers = json.loads(reply[3])
            return Begun(outcome, answer=Answer(int(reply[1]), bytes(reply[2]), {str(k): str(v) for k, v in headers.items()}))
        return Begun(outcome)

    async def finish(self, scope: str, key: str, fingerprint: str, owner: str, answer: Answer) -> bool:
        """Keep ``answer`` under the key for the TTL. False if the attempt no longer held it
        (its lease ran out and the key was taken or freed)."""
        args = ("finish", fingerprint, owner, self._ttl_ms, answer.status, answer.body, json.dumps(answer.headers))
        return bool(await self._script.run([_record_key(scope, key)], args))

    async def release(self, scope: str, key: str, fingerprint: str, owner: str) -> bool:
        """Free the key this attempt holds (it answered an error, which is not kept)."""
        return bool(await self._script.run([_record_key(scope, key)], ("release", fingerprint, owner)))
