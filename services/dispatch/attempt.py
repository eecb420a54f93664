"""One delivery attempt: the orders claimed (at most once; the fence checked just before
sending), one backend call within the backend's circuit, rate limit and call slots, and its
answers sorted into an :class:`Attempt`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from dercmd.consumer import retrying
from dercmd.events import CommandStatus, DispatchOrderV1, utcnow
from dercmd.fleet import Fleet
from dercmd.state.delivery import Deliveries, Outcome, Stage, Step, Transition

from . import backends, metrics
from .outcomes import Outcomes, key
from .pool import BackendPool
from .tokens import ResultTokens

log = logging.getLogger(__name__)

Failure = tuple[DispatchOrderV1, backends.BackendError]
#: Why an order past the caller's ``expiresAt`` ends: ``Failed: expired``.
EXPIRED = backends.NotDelivered("expired", "its expiresAt passed before it was delivered")


@dataclass
class Attempt:
    """Where one attempt left its orders: accepted by the backend, concluded, resumed from a
    recorded state, or to be sent again (with the error that says why)."""

    accepted: list[tuple[DispatchOrderV1, backends.Accepted]] = field(default_factory=list)
    failed: list[tuple[DispatchOrderV1, Outcome]] = field(default_factory=list)
    resumed: list[tuple[DispatchOrderV1, Transition]] = field(default_factory=list)
    again: list[Failure] = field(default_factory=list)
    unknown: list[Failure] = field(default_factory=list)
    #: Past the caller's ``expiresAt`` when their turn came: not claimed, never sent.
    expired: list[Failure] = field(default_factory=list)

    def merge(self, other: Attempt) -> None:
        self.accepted += other.accepted
        self.again += other.again


class Sender:
    def __init__(self, pool: BackendPool, deliveries: Deliveries, outcomes: Outcomes, fleet: Fleet, tokens: ResultTokens,
                 now: Callable[[], datetime]) -> None:
        self._now = now
        self._pool = pool
        self._deliveries = deliveries
        self._outcomes = outcomes
        self._fleet = fleet
        self._tokens = tokens

    async def attempt(self, orders: list[DispatchOrderV1], backend: backends.DeviceBackend | None) -> Attempt:
        """One claim and call, within the backend's rate limit, circuit and call slots."""
        if backend is None:
            return await self._claim_and_send(orders, None)
        guard = self._pool.guards[backend.name]
        if not guard.breaker.allow():
            # Nothing is claimed: the orders wait for the circuit like any not delivered.
            error = backends.NotDelivered("circuit_open", f"{backend.name} failed repeatedly; calls paused",
                                          retry_after_s=guard.breaker.reopens_in())
            return Attempt(again=[(o, error) for o in orders])
        await retrying(guard.limiter.acquire, "dispatch rate limit")
        async with self._pool.calls[backend.name]:
            return await self._claim_and_send(orders, backend)

    async def _claim_and_send(self, orders: list[DispatchOrderV1], backend: backends.DeviceBackend | None) -> Attempt:
        result = Attempt()
        now = self._now()
        # The last look at the caller's deadline, just before the claim: a call slot or the
        # rate limit may have held the orders past it.
        if any(o.expires_at is not None and o.expires_at <= now for o in orders):
            result.expired = [(o, EXPIRED) for o in orders if o.expires_at is not None and o.expires_at <= now]
            orders = [o for o in orders if o.expires_at is None or o.expires_at > now]
        claims = await retrying(lambda: self._deliveries.claim_many([(key(o), o.fence, o.end_at is not None) for o in orders]),
                                "dispatch claims")
        claimed: list[DispatchOrderV1] = []
        for order, claim in zip(orders, claims, strict=True):
            if claim.step is Step.STALE:
                # A newer command took the slot before this one was claimed; arbitration has
                # already reported this one Canceled (superseded).
                metrics.ORDERS.labels("stale").inc()
            elif claim.step is Step.CLAIMED and order.recovered and backend is not None:
                # Announced again by recovery, with no record here: Redis may have lost the
                # record of a delivery, so the backend is asked before it is sent.
                metrics.ORDERS.labels("recovered").inc()
                result.unknown.append((order, backends.DeliveryUnknown("delivery_unknown", "recovered with no delivery record")))
            elif claim.step is Step.CLAIMED:
                claimed.append(order)
            elif claim.stage is Stage.INFLIGHT and backend is not None:
                # An attempt died during the backend call (a crash, a stop): the device may or
                # may not have it, so it is asked about, never sent blindly.
                metrics.ORDERS.labels("redelivered").inc()
                result.unknown.append((order, backends.DeliveryUnknown("delivery_unknown", "dispatch stopped during the call")))
            else:
                # Seen before (redelivery): never call the backend again; carry on from what
                # the recorded state proves.
                metrics.ORDERS.labels("redelivered").inc()
                result.resumed.append((order, claim))
        if backend is None:
            for order in claimed:
                entity = self._fleet.entity(order.entity_id)
                detail = f"no backend {entity.backend!r} in this deployment" if entity else "entity not in the fleet"
                result.failed.append((order, Outcome(CommandStatus.FAILED, "backend_not_available", detail)))
            metrics.ORDERS.labels("failed").inc(len(result.failed))
            return result
        if claimed:
            await self._send(backend, claimed, result)
        return result

    def _delivery(self, order: DispatchOrderV1) -> backends.Delivery:
        return backends.Delivery(order, self._fleet.entities[order.entity_id], self._tokens.token(order.entity_id, order.command_id))

    async def _send(self, backend: backends.DeviceBackend, orders: list[DispatchOrderV1], result: Attempt) -> None:
        """One backend call; its answers sorted into ``result``."""
        chunk = [self._delivery(o) for o in orders]
        answers: list[backends.Accepted | backends.BackendError]
        started = time.perf_counter()
        whole: backends.BackendError | None = None
        try:
            answers = await backend.send(chunk)
            if len(answers) != len(chunk):
                raise RuntimeError(f"{backend.name} answered {len(answers)} of {len(chunk)} deliveries")
        except backends.BackendError as exc:
            whole = exc
            answers = [exc] * len(chunk)
        except Exception as exc:  # a backend bug: whether the devices got them is unknown
            log.exception("backend failed unexpectedly", extra={"backend": backend.name, "deliveries": len(chunk)})
            whole = backends.DeliveryUnknown("delivery_unknown", repr(exc))
            answers = [whole] * len(chunk)
        finally:
            metrics.BACKEND_SECONDS.labels(backend.name).observe(time.perf_counter() - started)
        guard = self._pool.guards[backend.name]
        guard.breaker.record(whole is None or isinstance(whole, backends.Refused))
        if isinstance(whole, backends.NotDelivered) and whole.retry_after_s:
            await retrying(lambda: guard.limiter.pause(whole.retry_after_s or 0.0), "dispatch rate limit")
        not_delivered: list[Failure] = []
        unknown: list[Failure] = []
        now = utcnow()
        for order, answer in zip(orders, answers, strict=True):
            if isinstance(answer, backends.Accepted):
                result.accepted.append((order, answer))
                metrics.ACCEPT_TO_SENT_SECONDS.observe((now - order.accepted_at).total_seconds())
            elif isinstance(answer, backends.NotDelivered):
                not_delivered.append((order, answer))
            elif isinstance(answer, backends.DeliveryUnknown):
                unknown.append((order, answer))
            else:
                result.failed.append((order, Outcome(CommandStatus.FAILED, answer.reason, answer.detail)))
                log.warning("backend refused", extra={"command_id": order.command_id, "entity_id": order.entity_id,
                                                      "reason": answer.reason, "detail": answer.detail})
        for label, count in (("accepted", len(result.accepted)), ("not_delivered", len(not_delivered)),
                             ("unknown", len(unknown)), ("refused", len(result.failed))):
            if count:
                metrics.BACKEND_CALLS.labels(backend.name, label).inc(count)
        metrics.ORDERS.labels("sent").inc(len(result.accepted))
        metrics.ORDERS.labels("failed").inc(len(result.failed))
        if not_delivered:
            again, resumed = await self._outcomes.not_taken(not_delivered)
            result.again += again
            result.resumed += resumed
        if unknown:
            log.warning("delivery unknown", extra={"backend": backend.name, "error": unknown[0][1].detail,
                                                   "command_ids": [o.command_id for o, _ in unknown][:20]})
            result.unknown += unknown
