"""At-most-once delivery, per command (``delivery.lua`` is the state machine).

Keys (entity ``E``, command ``C``):

- ``dercmd:{E}:delivery:C`` (string, kept :data:`STATE_TTL_S`): the command's delivery
  stage, written by dispatch only; read by dispatch and by the OCPP gateway (which refuses a
  charge point's late StartTransaction for a command that already ended otherwise). Its value is ``inflight``,
  ``accepted``, ``sent``, ``retry``, ``result:<outcome>`` or ``done:<outcome>``, where
  ``<outcome>`` is :meth:`Outcome.encode`.
- the entity's slots hash (:mod:`.slots` documents every field): a claim reads
  ``active_fence`` and writes ``delivered``, ``held`` and ``held_before``.

Every call answers a :class:`Transition`, decoded from the script's reply in one place
(:func:`_decode`): what the call did (:class:`Step`), the stage the command is in after it
(:class:`Stage`), and the outcome recorded with it, if any. Callers never see reply strings.

    claim    -> CLAIMED (deliver it) | STALE (a newer command owns the entity) | FOUND (a
                previous attempt's stage: a redelivery, never delivered twice)
    advance  -> ADVANCED | FOUND (a result that came first, or what another attempt recorded)
    retry    -> RETRY (may be claimed again) | SUPERSEDED (a newer command took the slot while
                the call was out: done as Canceled) | FOUND
    abandon  -> ABANDONED (recorded done with the outcome: publish it) | STALE | FOUND
    result   -> EMIT (Sent is out, or nothing was recorded: publish the result) | DEFERRED (held
                for the sender, who publishes it after Sent) | FOUND
    finish   -> FINISHED
    peek     -> FOUND
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import redis.asyncio as aioredis

from dercmd.events import CommandStatus

from .keys import STATE_TTL_S, delivery, slots
from .scripts import Script, source

_SCRIPT = source("delivery.lua")


@dataclass(frozen=True, slots=True)
class Outcome:
    """A terminal result, encoded into the delivery state as ``Status|reason|detail``."""

    status: CommandStatus
    reason: str | None = None
    detail: str | None = None

    def encode(self) -> str:
        return "|".join((self.status.value, self.reason or "", (self.detail or "").replace("|", "/")[:500]))

    @classmethod
    def decode(cls, raw: str) -> Outcome:
        status, reason, detail = (raw.split("|", 2) + ["", ""])[:3]
        return cls(CommandStatus(status), reason or None, detail or None)


#: What ``delivery.lua`` records for a command superseded between two attempts (same text).
SUPERSEDED = Outcome(CommandStatus.CANCELED, "superseded", "a newer command took the device while this one was not delivered")


class Stage(Enum):
    """Where a command's delivery is: inflight -> accepted -> sent -> done; a result during
    inflight/accepted is HELD until the sender has published Sent; inflight -> retry ->
    (claim) inflight for a command the backend did not take."""

    MISSING = "missing"  # nothing recorded: never claimed, or Redis lost it
    INFLIGHT = "inflight"  # claimed; the backend call is (or was, if dispatch died) out
    ACCEPTED = "accepted"  # the backend took it; Sent not yet on the topic
    SENT = "sent"  # Sent is on the topic; the result comes later
    RETRY = "retry"  # the backend did not take it: may be claimed again
    HELD = "result"  # a result came before Sent was out: held for the sender
    DONE = "done"  # terminal: the outcome is recorded


class Step(Enum):
    """What one call did."""

    CLAIMED = "claimed"
    STALE = "stale"
    ABANDONED = "abandoned"
    ADVANCED = "advanced"
    RETRY = "retry"
    SUPERSEDED = "superseded"
    EMIT = "emit"
    DEFERRED = "deferred"
    FINISHED = "finished"
    FOUND = "found"  # nothing changed: ``stage`` (and ``outcome``) is what was there


@dataclass(frozen=True, slots=True)
class Transition:
    """One call's answer: what it did, the stage after it, and the outcome the stage holds
    (HELD and DONE), or the one to publish (EMIT)."""

    step: Step
    stage: Stage
    outcome: Outcome | None = None

    @property
    def label(self) -> str:
        """The short text a backend's result route answers with (``emit``, ``deferred``,
        ``done:<outcome>``, ``missing``, ...)."""
        if self.step is not Step.FOUND:
            return self.step.value
        if self.outcome is not None:
            return f"{self.stage.value}:{self.outcome.encode()}"
        return self.stage.value


_STAGES = {s.value: s for s in Stage}
_STEPS = {"claimed": Step.CLAIMED, "stale": Step.STALE, "abandoned": Step.ABANDONED, "emit": Step.EMIT,
          "deferred": Step.DEFERRED, "superseded": Step.SUPERSEDED}


def _found(raw: str) -> Transition:
    stage, _, outcome = raw.partition(":")
    return Transition(Step.FOUND, _STAGES[stage], Outcome.decode(outcome) if outcome else None)


def _decode(op: str, raw: bytes | str, outcome: Outcome | None = None) -> Transition:
    """The script's reply to ``op`` as a :class:`Transition` (``outcome``: the one the call
    carried, which EMIT publishes and FINISHED recorded)."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if (step := _STEPS.get(text)) is not None:
        if step is Step.CLAIMED:
            return Transition(step, Stage.INFLIGHT)
        if step is Step.STALE:
            return Transition(step, Stage.MISSING)
        if step is Step.DEFERRED:
            return Transition(step, Stage.HELD, outcome)
        if step is Step.SUPERSEDED:
            return Transition(step, Stage.DONE, SUPERSEDED)
        return Transition(step, Stage.DONE, outcome)  # abandoned, emit
    if op == "retry" and text == "retry":
        return Transition(Step.RETRY, Stage.RETRY)
    if op == "finish":
        return Transition(Step.FINISHED, Stage.DONE, outcome)
    return _found(text)


Key = tuple[str, str]  # (entity id, command id)


class Deliveries:
    """Each method comes in a batch form (one Redis round trip for many commands, run in the
    order given) and a one-command form."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._script = Script(redis, _SCRIPT)

    async def _call_many(self, calls: Sequence[tuple[Key, Sequence[object]]]) -> list[bytes | str]:
        return await self._script.run_many(
            [([slots(entity_id), delivery(entity_id, command_id)], args) for (entity_id, command_id), args in calls]
        )

    async def claim_many(self, orders: Sequence[tuple[Key, int, bool]]) -> list[Transition]:
        """Per ``((entity, command), fence, window)``: CLAIMED (deliver it), STALE (a newer
        command owns the entity), or FOUND with the stage a previous attempt left.
        ``window``: the command holds the device until its end (what arbitration must revert
        if nothing newer reaches it)."""
        replies = await self._call_many([(key, ("claim", fence, STATE_TTL_S, key[1], "1" if window else "0"))
                                         for key, fence, window in orders])
        return [_decode("claim", r) for r in replies]

    async def advance_many(self, keys: Sequence[Key], from_stage: Stage, to_stage: Stage) -> list[Transition]:
        """ADVANCED to ``to_stage`` where the stage was ``from_stage``, else FOUND (a result
        that arrived first, or what another attempt recorded). INFLIGHT -> ACCEPTED: the
        backend took it; ACCEPTED -> SENT: Sent is on the topic."""
        replies = await self._call_many([(key, ("advance", from_stage.value, to_stage.value)) for key in keys])
        # The script answers the stage it moved to, or the one it found; finding the target
        # stage already (another attempt moved it) counts as moved, as it always has.
        found = [_decode("advance", raw) for raw in replies]
        return [Transition(Step.ADVANCED, to_stage) if t.stage is to_stage else t for t in found]

    async def retry_many(self, orders: Sequence[tuple[Key, int]]) -> list[Transition]:
        """Commands the backend did not take, per ``((entity, command), fence)``: RETRY (it
        may be claimed again), SUPERSEDED (a newer command took the slot meanwhile: done as
        Canceled, to be reported), or FOUND."""
        replies = await self._call_many([(key, ("retry", key[1], fence)) for key, fence in orders])
        return [_decode("retry", r) for r in replies]

    async def abandon_many(self, orders: Sequence[tuple[Key, int, Outcome]]) -> list[Transition]:
        """Orders not delivered by their deadline, per ``((entity, command), fence, outcome)``:
        ABANDONED (recorded as done with the outcome: publish it), STALE (arbitration
        reported it), or FOUND."""
        replies = await self._call_many([(key, ("abandon", fence, outcome.encode(), STATE_TTL_S, key[1]))
                                         for key, fence, outcome in orders])
        return [_decode("abandon", r, o) for r, (_, _, o) in zip(replies, orders, strict=True)]

    async def result_many(self, results: Sequence[tuple[Key, Outcome]]) -> list[Transition]:
        """A backend's asynchronous results: EMIT (Sent is out: publish it), DEFERRED (the
        sender publishes it after Sent), or FOUND. With no state at all (Redis lost it), the
        result is recorded and EMIT."""
        replies = await self._call_many([(key, ("result", outcome.encode(), STATE_TTL_S)) for key, outcome in results])
        return [_decode("result", r, o) for r, (_, o) in zip(replies, results, strict=True)]

    async def finish_many(self, results: Sequence[tuple[Key, Outcome]]) -> None:
        """Record terminal results after they are published."""
        await self._call_many([(key, ("finish", outcome.encode(), STATE_TTL_S)) for key, outcome in results])

    async def peek_many(self, keys: Sequence[Key]) -> list[Transition]:
        """The stages found (FOUND), changing nothing (MISSING where there is none)."""
        return [_decode("peek", r) for r in await self._call_many([(key, ("peek",)) for key in keys])]

    async def claim(self, entity_id: str, command_id: str, fence: int, window: bool = False) -> Transition:
        return (await self.claim_many([((entity_id, command_id), fence, window)]))[0]

    async def accepted(self, entity_id: str, command_id: str) -> Transition:
        return (await self.advance_many([(entity_id, command_id)], Stage.INFLIGHT, Stage.ACCEPTED))[0]

    async def sent(self, entity_id: str, command_id: str) -> Transition:
        return (await self.advance_many([(entity_id, command_id)], Stage.ACCEPTED, Stage.SENT))[0]

    async def result(self, entity_id: str, command_id: str, outcome: Outcome) -> Transition:
        return (await self.result_many([((entity_id, command_id), outcome)]))[0]

    async def finish(self, entity_id: str, command_id: str, outcome: Outcome) -> None:
        await self.finish_many([((entity_id, command_id), outcome)])
