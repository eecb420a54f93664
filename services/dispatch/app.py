"""The dispatch service: delivers ``dercmd.dispatch.orders`` through the entities' backends,
in parallel across entities and in order within one, and takes the results backends report.

Per batch of orders: grouped by backend and cut into calls of up to the backend's batch size,
each call a task that waits for whatever earlier work still has one of its entities, then for
one of the backend's ``DERCMD_DISPATCH_CONCURRENCY`` call slots, then claims its orders in one
Redis round trip (at most once; the fence checked just before sending) and sends them. The
consumer fetches on meanwhile (the handler returns before the backends answer), so a slow
backend delays only its own entities' deliveries; offsets are committed once a batch and every
batch before it are done, so a dead backend does hold the commits (and, past 64 batches,
the fetching) of the partitions it shares with others.

The orders topic also carries delivery checks (:class:`DeliveryCheckV1`, from the status
service's sweeper: a command left ``Sent`` past its deadline). A batch's checks are one more
task: the commands' delivery states in one Redis round trip, the backends asked what became of
the open ones in one call per backend, and each outcome applied like a callback's result.
Measurement reports (periodic, and the extra one after a window starts or ends) are
:mod:`.reports`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from dercmd import topics
from dercmd.clock import SharedClock
from dercmd.consumer import Item, retrying
from dercmd.events import CommandStatus, DeliveryCheckV1, DispatchOrderV1, Event, StatusEventV1, utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.common import DeviceReports
from dercmd.service import Service
from dercmd.settings import Settings

from . import backends, metrics
from .delivery import Deliveries, Key, Outcome
from .reports import REPORTS_PATH, Reports
from .resilience import CircuitBreaker, RateLimiter, RetryPolicy
from .tokens import ResultTokens

log = logging.getLogger(__name__)

Records = list[tuple[topics.Topic, Event, str]]

#: How many batches the consumer may hand out before the oldest has finished.
MAX_PENDING_BATCHES = 64


def _key(order: DispatchOrderV1 | DeliveryCheckV1) -> Key:
    return (order.entity_id, order.command_id)


SENT = Outcome(CommandStatus.SENT)
#: What ``delivery.lua`` records for a command superseded between two attempts (same text).
SUPERSEDED = Outcome(CommandStatus.CANCELED, "superseded", "a newer command took the device while this one was not delivered")


def _status(entity_id: str, command_id: str, outcome: Outcome, fence: int | None = None) -> tuple[topics.Topic, Event, str]:
    event = StatusEventV1(command_id=command_id, entity_id=entity_id, status=outcome.status, fence=fence,
                          reason=outcome.reason, detail=outcome.detail)
    return (topics.STATUS, event, entity_id)


def _order_status(order: DispatchOrderV1, outcome: Outcome) -> tuple[topics.Topic, Event, str]:
    return _status(order.entity_id, order.command_id, outcome, order.fence)


class Dispatcher:
    """Turns orders into at most one backend delivery each and the status events they earn."""

    def __init__(self, service: Service, fleet: Fleet) -> None:
        self._settings = service.settings
        self._publisher = service.publisher
        self._fleet = fleet
        self._deliveries = Deliveries(service.redis)
        self.clock = SharedClock(service.redis)
        self._backends: dict[str, backends.DeviceBackend] = {}
        self._calls: dict[str, asyncio.Semaphore] = {}
        self._guards: dict[str, _Guard] = {}
        self._retry = RetryPolicy(service.settings.dispatch_retry_for_s, service.settings.dispatch_retry_base_ms / 1000,
                                  service.settings.dispatch_retry_max_ms / 1000)
        self.tokens = ResultTokens(service.settings.callback_secret)
        #: Per entity, the delivery work that last took one of its commands: a later command
        #: of the entity is sent only after it. Entries leave when their work is done.
        self._tails: dict[str, asyncio.Future[Any]] = {}
        #: Per notBefore, the held calls that woke and have not sent yet (see ``_call``).
        self._sending: dict[datetime, _Countdown] = {}
        self.reports = Reports(service.publisher, fleet, service.settings)
        self.context = backends.BackendContext(
            settings=service.settings, fleet=fleet, redis=service.redis, callback_base_url=service.settings.callback_base_url,
            token=self.tokens.token, entity_of=self.tokens.entity_of, report=self.on_results,
        )

    def make_backends(self) -> list[backends.DeviceBackend]:
        """The backends the fleet uses (registered ones; an entity of any other fails with
        ``backend_not_available``)."""
        return [b for name in sorted({e.backend for e in self._fleet.entities.values()}) if (b := self._backend(name))]

    async def start(self) -> None:
        """Start the backends, and subscribe to their reports."""
        for backend in self.make_backends():
            await backend.start()
        self.reports.start(self._backends)
        await self.clock.start()

    def _backend_name(self, entity_id: str) -> str | None:
        """The entity's backend, if it is in the fleet and deployed here."""
        entity = self._fleet.entity(entity_id)
        backend = self._backend(entity.backend) if entity else None
        return backend.name if backend else None

    def _backend(self, name: str) -> backends.DeviceBackend | None:
        if name not in self._backends:
            backend = backends.create(name, self.context)
            if backend is None:
                return None
            self._backends[name] = backend
            self._calls[name] = asyncio.Semaphore(self._settings.dispatch_concurrency)
            own = backends.registered()[name].settings()
            self._guards[name] = _Guard(
                RateLimiter(self.context.redis, name, own.rate_per_s, own.burst),
                CircuitBreaker(name, self._settings.dispatch_breaker_failures, self._settings.dispatch_breaker_open_s),
            )
        return self._backends[name]

    async def aclose(self) -> None:
        await self.clock.stop()
        await self.reports.aclose()
        for backend in self._backends.values():
            await backend.aclose()

    # -- orders --------------------------------------------------------------------------

    async def handle(self, items: list[Item[DispatchOrderV1 | DeliveryCheckV1]]) -> Awaitable[None]:
        """Start delivering a batch: its orders are grouped by backend and cut into calls, each
        call a task of its own, and its checks are one more task. Returns what finishes when
        every task has finished."""
        # By backend, and by the time before which an order is not to be sent (a start or end
        # arbitration acted on ahead of time): one call's orders go at once.
        groups: dict[tuple[str | None, datetime | None], list[DispatchOrderV1]] = defaultdict(list)
        checks: list[DeliveryCheckV1] = []
        for item in items:
            event = item.event
            if isinstance(event, DeliveryCheckV1):
                checks.append(event)
                continue
            groups[(self._backend_name(event.entity_id), event.not_before)].append(event)
        calls: list[asyncio.Future[None]] = [asyncio.ensure_future(self._check(checks))] if checks else []
        for (name, _), orders in groups.items():
            backend = self._backends[name] if name is not None else None
            size = max(1, min(backend.max_batch, self._settings.dispatch_backend_batch)) if backend else len(orders)
            calls += [self._start(backend, orders[i : i + size]) for i in range(0, len(orders), size)]
        return _all(calls)

    def _start(self, backend: backends.DeviceBackend | None, orders: list[DispatchOrderV1]) -> asyncio.Future[None]:
        """A task for one call, after whatever earlier work still has one of its entities."""
        entities = [o.entity_id for o in orders]
        before = list({id(t): t for e in entities if (t := self._tails.get(e)) is not None}.values())
        task = asyncio.ensure_future(self._call(backend, orders, before))
        for entity_id in entities:
            self._tails[entity_id] = task

        def _forget(done: asyncio.Future[None]) -> None:
            for entity_id in entities:
                if self._tails.get(entity_id) is done:
                    del self._tails[entity_id]

        task.add_done_callback(_forget)
        return task

    async def _call(self, backend: backends.DeviceBackend | None, orders: list[DispatchOrderV1],
                    before: Sequence[asyncio.Future[None]]) -> None:
        if before:
            await asyncio.wait(before)
        sending = None
        if (not_before := orders[0].not_before) is not None:
            # Held here, unclaimed, until its time by Redis's clock (the one arbitration
            # decided by, whatever this host's says): a newer command that supersedes it
            # meanwhile makes it stale, and a stop leaves it to the next owner. Every call
            # held for one time wakes at once (a window of thousands of devices): they all
            # send before any of them records its outcomes, so the devices get the window's
            # start as close to its time as the backends allow.
            await asyncio.sleep(self.clock.seconds_until(not_before))
            sending = self._sending.setdefault(not_before, _Countdown())
            sending.add()
        await self._settle(orders, backend, sending)

    async def _settle(self, orders: list[DispatchOrderV1], backend: backends.DeviceBackend | None,
                      sending: _Countdown | None = None) -> None:
        """Claim the orders (at most once; the fence is checked now, just before sending) and
        take each as far as it goes: sent, concluded, or resumed from an earlier attempt. A
        task cancelled before this point leaves its orders unclaimed for the next attempt.

        What the backend did not take is claimed and sent again after a backoff, until its
        deadline; what it may have taken (no answer) is asked about, and sent again only if the
        backend says it never got it. The entity's later commands wait for all of that.

        Only the claim and the backend call hold one of the backend's call slots: recording
        the outcomes (Redis, then the broker's acks) happens after, so the slots carry calls."""
        unique = _first_of_each(orders)
        if len(unique) < len(orders):
            # The same order twice in one call (a redelivered copy): the first one speaks for both.
            metrics.ORDERS.labels("redelivered").inc(len(orders) - len(unique))
            orders = unique
        attempt = 0
        while orders:
            try:
                result = await self._attempt(orders, backend)
            finally:
                if sending is not None:
                    sending.done()  # sent (or failed to): the others need not wait for it
            if sending is not None:
                await sending.wait()
                self._sending = {t: c for t, c in self._sending.items() if not c.finished}
                sending = None
            # From here on every step is idempotent, so a failed dependency is simply retried:
            # nothing may leave a delivered command without its outcome.
            await retrying(lambda: self._record(result.accepted, result.failed, result.resumed), "dispatch results")
            if result.unknown and backend is not None:
                # What may have reached the device is asked about only once the request can no
                # longer be on its way (a slow backend still working on it would answer
                # "never got it" and the command would go twice).
                await asyncio.sleep(self._settings.dispatch_unknown_grace_s)
                resolved = _Attempt()
                await self._resolve(backend, result.unknown, resolved)
                await retrying(lambda: self._record(resolved.accepted, resolved.failed, resolved.resumed), "dispatch results")
                result.accepted += resolved.accepted
                result.again += resolved.again
            if result.accepted and backend is not None:
                self.reports.delivered(backend.name, [o for o, _ in result.accepted])
            if backend is None or not result.again:
                return
            orders = await self._again(backend, result.again, attempt)
            attempt += 1

    async def _attempt(self, orders: list[DispatchOrderV1], backend: backends.DeviceBackend | None) -> _Attempt:
        """One claim and call, within the backend's rate limit, circuit and call slots."""
        if backend is None:
            return await self._claim_and_send(orders, None)
        guard = self._guards[backend.name]
        if not guard.breaker.allow():
            # Nothing is claimed: the orders wait for the circuit like any not delivered.
            error = backends.NotDelivered("circuit_open", f"{backend.name} failed repeatedly; calls paused",
                                          retry_after_s=guard.breaker.reopens_in())
            return _Attempt(again=[(o, error) for o in orders])
        await retrying(guard.limiter.acquire, "dispatch rate limit")
        async with self._calls[backend.name]:
            return await self._claim_and_send(orders, backend)

    async def _again(self, backend: backends.DeviceBackend, again: list[tuple[DispatchOrderV1, backends.BackendError]],
                     attempt: int) -> list[DispatchOrderV1]:
        """The orders to send again, after the backoff; those past their deadline end Failed."""
        now = self.clock.now()
        retry_after = max((e.retry_after_s or 0.0 for _, e in again if isinstance(e, backends.NotDelivered)), default=0.0)
        wait_s = self._retry.backoff_s(attempt, retry_after)
        late = [(o, e) for o, e in again if self._retry.deadline(o) < now + timedelta(seconds=wait_s)]
        if late:
            await self._give_up(late)
        late_ids = {o.command_id for o, _ in late}
        keep = [o for o, _ in again if o.command_id not in late_ids]
        for _, error in again:
            metrics.RETRIES.labels(backend.name, error.reason).inc()
        if keep:
            log.info("sending again", extra={"backend": backend.name, "commands": len(keep), "wait_s": round(wait_s, 3),
                                             "command_ids": [o.command_id for o in keep][:20]})
            await asyncio.sleep(wait_s)
        return keep

    async def _give_up(self, late: list[tuple[DispatchOrderV1, backends.BackendError]]) -> None:
        """Orders not delivered by their deadline end Failed, recorded as done first (so that a
        redelivered copy is never sent after its Failed; what the device holds is untouched).
        One a newer command made stale was reported by arbitration."""
        outcomes = {o.command_id: Outcome(CommandStatus.FAILED, e.reason, f"not delivered by its deadline: {e.detail}") for o, e in late}
        states = await retrying(lambda: self._deliveries.abandon_many([(_key(o), o.fence, outcomes[o.command_id]) for o, _ in late]),
                                "dispatch results")
        publish: Records = []
        resumed: list[tuple[DispatchOrderV1, str]] = []
        for (order, _), state in zip(late, states, strict=True):
            if state == "abandoned":
                publish.append(_order_status(order, outcomes[order.command_id]))
            elif state != "stale":
                resumed.append((order, state))
        metrics.ORDERS.labels("failed").inc(len(publish))
        await retrying(lambda: self._publisher.publish_all(publish), "dispatch results")
        await retrying(lambda: self._record([], [], resumed), "dispatch results")

    async def _claim_and_send(self, orders: list[DispatchOrderV1], backend: backends.DeviceBackend | None) -> _Attempt:
        claims = await retrying(lambda: self._deliveries.claim_many([(_key(o), o.fence, o.end_at is not None) for o in orders]),
                                "dispatch claims")
        claimed: list[DispatchOrderV1] = []
        result = _Attempt()
        for order, claim in zip(orders, claims, strict=True):
            if claim == "stale":
                # A newer command took the slot before this one was claimed; arbitration has
                # already reported this one Canceled (superseded).
                metrics.ORDERS.labels("stale").inc()
            elif claim == "claimed" and order.recovered and backend is not None:
                # Announced again by recovery, with no record here: Redis may have lost the
                # record of a delivery, so the backend is asked before it is sent.
                metrics.ORDERS.labels("recovered").inc()
                result.unknown.append((order, backends.DeliveryUnknown("delivery_unknown", "recovered with no delivery record")))
            elif claim == "claimed":
                claimed.append(order)
            elif claim == "inflight" and backend is not None:
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
        return backends.Delivery(order, self._fleet.entities[order.entity_id], self.tokens.token(order.entity_id, order.command_id))

    async def _send(self, backend: backends.DeviceBackend, orders: list[DispatchOrderV1], result: _Attempt) -> None:
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
        guard = self._guards[backend.name]
        guard.breaker.record(whole is None or isinstance(whole, backends.Refused))
        if isinstance(whole, backends.NotDelivered) and whole.retry_after_s:
            await retrying(lambda: guard.limiter.pause(whole.retry_after_s or 0.0), "dispatch rate limit")
        not_delivered: list[tuple[DispatchOrderV1, backends.BackendError]] = []
        unknown: list[tuple[DispatchOrderV1, backends.BackendError]] = []
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
            await self._not_taken(not_delivered, result)
        if unknown:
            log.warning("delivery unknown", extra={"backend": backend.name, "error": unknown[0][1].detail,
                                                   "command_ids": [o.command_id for o, _ in unknown][:20]})
            result.unknown += unknown

    async def _not_taken(self, orders: list[tuple[DispatchOrderV1, backends.BackendError]], result: _Attempt) -> None:
        """The backend did not take these: they may be claimed and sent again."""
        states = await retrying(lambda: self._deliveries.retry_many([(_key(o), o.fence) for o, _ in orders]), "dispatch retries")
        for (order, error), state in zip(orders, states, strict=True):
            if state in ("retry", "missing"):  # "missing": Redis lost the claim; claimed again
                result.again.append((order, error))
            elif state == "superseded":  # taken over while its call was out: arbitration left it to us
                metrics.ORDERS.labels("stale").inc()
                result.resumed.append((order, f"done:{SUPERSEDED.encode()}"))
            else:  # a result came meanwhile (it was delivered after all): carry on from it
                result.resumed.append((order, state))

    async def _resolve(self, backend: backends.DeviceBackend, orders: list[tuple[DispatchOrderV1, backends.BackendError]],
                       result: _Attempt) -> None:
        """Deliveries whose fate is unknown: the backend is asked (it reads the device back where
        its protocol can). Delivered: on as if it had answered; never received: sent again;
        the backend cannot say: ``Failed: delivery_unknown`` (never sent blindly again)."""
        asked = await _ask(backend, [backends.Query(self._fleet.entities[o.entity_id], o.command_id, o) for o, _ in orders])
        findings: list[backends.CommandOutcome | None] = list(asked) if isinstance(asked, list) else [None] * len(orders)
        never: list[tuple[DispatchOrderV1, backends.BackendError]] = []
        found: list[tuple[tuple[str, str], Outcome]] = []
        for (order, error), finding in zip(orders, findings, strict=True):
            if finding is None:
                metrics.UNKNOWN_DELIVERIES.labels(backend.name, "unresolved").inc()
                result.failed.append((order, Outcome(CommandStatus.FAILED, "delivery_unknown", error.detail)))
            elif finding.finding is backends.Finding.UNKNOWN:
                metrics.UNKNOWN_DELIVERIES.labels(backend.name, "never_received").inc()
                # Sent as an ordinary order from here on (a recovered one is not asked about again).
                never.append((order.model_copy(update={"recovered": False}),
                              backends.NotDelivered("delivery_unknown", f"{backend.name} never got it: {error.detail}")))
            else:
                metrics.UNKNOWN_DELIVERIES.labels(backend.name, "delivered").inc()
                result.accepted.append((order, backends.Accepted(backends.Confirmation.ASYNC)))
                if finding.finding is not backends.Finding.PENDING:
                    found.append((_key(order), device_result(finding.finding is backends.Finding.SUCCEEDED, finding.message)))
        if found:  # held as the result until Sent is out (the state is still inflight)
            await retrying(lambda: self._deliveries.result_many(found), "dispatch results")
        if never:
            await self._not_taken(never, result)

    async def _record(self, accepted: list[tuple[DispatchOrderV1, backends.Accepted]],
                      failed: list[tuple[DispatchOrderV1, Outcome]], resumed: list[tuple[DispatchOrderV1, str]]) -> None:
        states = await self._deliveries.advance_many([_key(o) for o, _ in accepted], "inflight", "accepted")
        resumed = list(resumed)
        for (order, answer), state in zip(accepted, states, strict=True):
            if answer.confirmation is backends.Confirmation.SYNC and state == "accepted":
                state = f"result:{Outcome(CommandStatus.SUCCEEDED).encode()}"
            resumed.append((order, state))
        await self._conclude(failed)
        await self._resume(resumed)

    async def _resume(self, orders: Sequence[tuple[DispatchOrderV1, str]]) -> None:
        """Take commands from their recorded delivery state to wherever they can get now."""
        sent: Records = []
        advance: list[DispatchOrderV1] = []
        conclude: list[tuple[DispatchOrderV1, Outcome]] = []
        repeat: Records = []
        for order, state in orders:
            if state == "inflight":
                # An attempt died during the backend call and there is no backend here to ask.
                conclude.append((order, Outcome(CommandStatus.FAILED, "delivery_unknown", "dispatch stopped during the backend call")))
            elif state == "accepted":
                sent.append(_order_status(order, SENT))
                advance.append(order)
            elif state in ("sent", "missing"):
                # The result comes by callback. "missing": the backend took it, but Redis lost
                # the delivery state meanwhile (restarted empty); the callback's result is
                # recorded then, or a delivery check asks for it.
                sent.append(_order_status(order, SENT))
            elif state.startswith("result:"):  # the callback came first and was held back
                sent.append(_order_status(order, SENT))
                conclude.append((order, Outcome.decode(state.removeprefix("result:"))))
            elif state.startswith("done:"):
                repeat.append(_order_status(order, Outcome.decode(state.removeprefix("done:"))))
        await self._publisher.publish_all(sent + repeat)
        after = await self._deliveries.advance_many([_key(o) for o in advance], "accepted", "sent")
        conclude += [(o, Outcome.decode(a.removeprefix("result:"))) for o, a in zip(advance, after, strict=True) if a.startswith("result:")]
        await self._conclude(conclude)

    async def _conclude(self, outcomes: Sequence[tuple[DispatchOrderV1, Outcome]]) -> None:
        """Publish terminal statuses, then record them: a crash in between re-publishes them."""
        if not outcomes:
            return
        await self._publisher.publish_all([_order_status(order, outcome) for order, outcome in outcomes])
        await self._deliveries.finish_many([(_key(order), outcome) for order, outcome in outcomes])

    # -- results reported by backends ----------------------------------------------------

    async def on_results(self, reported: Sequence[backends.DeviceResult]) -> list[str]:
        """Backends' asynchronous results: publishes those whose Sent is out; returns each
        one's delivery state."""
        results = [(r.entity_id, r.command_id, device_result(r.succeeded, r.message)) for r in reported]
        for status, count in Counter(outcome.status.value for _, _, outcome in results).items():
            metrics.CALLBACKS.labels(status).inc(count)
        # Held calls sending now (a window's start) go first: results can wait a moment.
        for sending in list(self._sending.values()):
            await sending.wait()
        return await self._apply_results(results)

    async def _apply_results(self, results: Sequence[tuple[str, str, Outcome]]) -> list[str]:
        """Results through the delivery state machine, a callback's or a check's alike: each
        command gets one terminal status, whichever result comes first."""
        states = await self._deliveries.result_many([((e, c), o) for e, c, o in results])
        events: Records = []
        for (entity_id, command_id, outcome), state in zip(results, states, strict=True):
            if state == "emit" or state.startswith("done:"):
                # "done:" too: a repeated callback after a failed publish must publish again
                # (the event id makes a second copy harmless); it carries the recorded outcome.
                recorded = outcome if state == "emit" else Outcome.decode(state.removeprefix("done:"))
                events.append(_status(entity_id, command_id, recorded))
        await self._publisher.publish_all(events)
        return states

    # -- delivery checks -----------------------------------------------------------------

    async def _check(self, checks: list[DeliveryCheckV1]) -> None:
        """Commands left ``Sent`` past their deadline: where the delivery state says the
        command is open (``sent``, or ``accepted`` with Sent on its way), the backend's word on
        it, or ``Failed: no_confirmation`` when it has none, goes through the state machine
        like a callback's result; a late genuine callback then finds it done and republishes
        the recorded outcome. Where the command already ended, the recorded outcome is
        published again (the sweeper only asks while the ledger still says Sent, so its
        terminal event was lost; the same event id makes a second copy harmless). Anything
        else (not claimed, in flight, a result held for the sender) is left alone."""
        checks = _first_of_each(checks)
        states = await retrying(lambda: self._deliveries.peek_many([_key(c) for c in checks]), "dispatch checks")
        open_: list[DeliveryCheckV1] = []
        forgotten: set[str] = set()
        again: Records = []
        for check, state in zip(checks, states, strict=True):
            if state in ("sent", "accepted", "missing"):
                # "missing": nothing in Redis (it restarted empty, or this was never claimed):
                # asked too, and decided only if the backend has a result for it.
                open_.append(check)
                if state == "missing":
                    forgotten.add(check.command_id)
            elif state.startswith("done:"):
                metrics.CHECKS.labels("republished").inc()
                again.append(_status(check.entity_id, check.command_id, Outcome.decode(state.removeprefix("done:"))))
            else:
                metrics.CHECKS.labels("not_open").inc()
                log.info("delivery check of a command not open", extra={"command_id": check.command_id,
                                                                        "entity_id": check.entity_id, "state": state})
        outcomes = await self._outcomes(open_)
        if forgotten:
            known = [(c, o) for c, o in zip(open_, outcomes, strict=True)
                     if c.command_id not in forgotten or o.reason != NO_CONFIRMATION]
            metrics.CHECKS.labels("not_open").inc(len(open_) - len(known))
            open_, outcomes = [c for c, _ in known], [o for _, o in known]
        for check, outcome in zip(open_, outcomes, strict=True):
            _count_check(check, outcome)
        results = [(c.entity_id, c.command_id, o) for c, o in zip(open_, outcomes, strict=True)]
        await retrying(lambda: self._publisher.publish_all(again), "dispatch checks")
        await retrying(lambda: self._apply_results(results), "dispatch checks")

    async def _outcomes(self, checks: Sequence[DeliveryCheckV1]) -> list[Outcome]:
        """What became of each command, per its backend (one query per backend, concurrently)."""
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, check in enumerate(checks):
            groups[self._backend_name(check.entity_id)].append(i)
        outcomes: list[Outcome] = [_unconfirmed("")] * len(checks)  # each replaced below

        async def ask(name: str | None, positions: list[int]) -> None:
            backend = self._backends[name] if name is not None else None
            # (an entity outside the fleet has no backend here, and nothing to build a query from)
            queries = [backends.Query(self._fleet.entities[checks[i].entity_id], checks[i].command_id) for i in positions] if backend else []
            asked = await _ask(backend, queries)
            found = [_from_finding(a, name) for a in asked] if isinstance(asked, list) else [_unconfirmed(asked)] * len(positions)
            for i, outcome in zip(positions, found, strict=True):
                outcomes[i] = outcome

        await asyncio.gather(*(ask(name, positions) for name, positions in groups.items()))
        return outcomes


NO_CONFIRMATION = "no_confirmation"


def _unconfirmed(detail: str) -> Outcome:
    return Outcome(CommandStatus.FAILED, NO_CONFIRMATION, detail)


def device_result(succeeded: bool, message: str | None) -> Outcome:
    """What a device did, as its backend reports it (a callback, or an answer to a check)."""
    return Outcome(CommandStatus.SUCCEEDED) if succeeded else Outcome(CommandStatus.FAILED, "device_failed", message)


async def _ask(backend: backends.DeviceBackend | None, queries: list[backends.Query]) -> list[backends.CommandOutcome] | str:
    """What the backend says became of each command, in order, or why it cannot say (it offers no
    queries, the query failed, or a bug answered the wrong number)."""
    if not isinstance(backend, backends.OutcomeQueries):
        return f"{backend.name if backend is not None else 'no backend here'} cannot be asked what became of it"
    try:
        answers = await backend.outcomes(queries)
        if len(answers) != len(queries):
            raise RuntimeError(f"{backend.name} answered {len(answers)} of {len(queries)} queries")
        return list(answers)
    except Exception as exc:  # a BackendError, or a bug: either way it cannot say now
        log.warning("outcome query failed", extra={"backend": backend.name, "error": repr(exc),
                                                   "command_ids": [q.command_id for q in queries][:20]})
        return f"{backend.name} could not be asked: {exc}"


def _from_finding(outcome: backends.CommandOutcome, backend: str | None) -> Outcome:
    if outcome.finding in (backends.Finding.SUCCEEDED, backends.Finding.FAILED):
        return device_result(outcome.finding is backends.Finding.SUCCEEDED, outcome.message)
    return _unconfirmed(f"{backend} says {outcome.finding.value} after the deadline")


def _count_check(check: DeliveryCheckV1, outcome: Outcome) -> None:
    result = NO_CONFIRMATION if outcome.reason == NO_CONFIRMATION else outcome.status.value.lower()
    metrics.CHECKS.labels(result).inc()
    (log.warning if result == NO_CONFIRMATION else log.info)(
        "delivery check", extra={"command_id": check.command_id, "entity_id": check.entity_id, "outcome": outcome.encode()}
    )


O = TypeVar("O", DispatchOrderV1, DeliveryCheckV1)


@dataclass(frozen=True, slots=True)
class _Guard:
    limiter: RateLimiter
    breaker: CircuitBreaker


@dataclass
class _Attempt:
    """Where one attempt left its orders: accepted by the backend, concluded, resumed from a
    recorded state, or to be sent again (with the error that says why)."""

    accepted: list[tuple[DispatchOrderV1, backends.Accepted]] = field(default_factory=list)
    failed: list[tuple[DispatchOrderV1, Outcome]] = field(default_factory=list)
    resumed: list[tuple[DispatchOrderV1, str]] = field(default_factory=list)
    again: list[tuple[DispatchOrderV1, backends.BackendError]] = field(default_factory=list)
    unknown: list[tuple[DispatchOrderV1, backends.BackendError]] = field(default_factory=list)


class _Countdown:
    """The held calls of one time that woke and have not sent yet; they record their
    outcomes once it is zero."""

    def __init__(self) -> None:
        self._left = 0
        self._zero = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self._left == 0

    def add(self) -> None:
        self._left += 1
        self._zero.clear()

    def done(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._zero.set()

    async def wait(self) -> None:
        await self._zero.wait()


def _first_of_each(orders: list[O]) -> list[O]:
    seen: set[str] = set()
    return [o for o in orders if not (o.command_id in seen or seen.add(o.command_id))]


async def _all(calls: list[asyncio.Future[None]]) -> None:
    """Done when every call is (a batch is committed only then); raises the first error after
    that. Cancelled (dispatch stopping, partitions revoked): cancels the calls, and a call not
    yet claimed leaves its orders to the next owner untouched."""
    try:
        await asyncio.wait(calls)
    except asyncio.CancelledError:
        for call in calls:
            call.cancel()
        raise
    for call in calls:
        if call.exception() is not None:
            raise call.exception()  # type: ignore[misc]


def build(settings: Settings) -> Service:
    service = Service("dispatch", settings, settings.dispatch_port)
    dispatcher = Dispatcher(service, Fleet.load(settings.fleet_file))
    service.consume(topics.ORDERS, dispatcher.handle, max_pending=MAX_PENDING_BATCHES)
    service.starters.append(dispatcher.start)
    service.closers.append(dispatcher.aclose)
    add_routes(service.app, dispatcher)
    return service


def add_routes(app: FastAPI, dispatcher: Dispatcher) -> None:
    """What backends POST to dispatch: each backend's own routes (results), and measurement
    reports."""
    for backend in dispatcher.make_backends():
        if backend.router is not None:
            app.include_router(backend.router)

    @app.post(REPORTS_PATH, include_in_schema=False)
    async def device_reports(backend: str, request: Request) -> JSONResponse:
        """A backend's periodic reports, authenticated by the token dispatch subscribed with."""
        if not dispatcher.reports.genuine(backend, request.headers.get("authorization")):
            metrics.REPORTS_REFUSED.labels("unauthorized").inc()
            return JSONResponse({"key": "unauthorized", "message": "not the token dispatch subscribed with"}, status_code=401)
        try:
            body = DeviceReports.model_validate_json(await request.body())
        except ValidationError as exc:
            metrics.REPORTS_REFUSED.labels("malformed").inc()
            return JSONResponse({"key": "invalid_report", "message": str(exc)[:2000]}, status_code=400)
        unknown = await dispatcher.reports.publish(backend, body.reports)
        return JSONResponse({"published": len(body.reports) - len(unknown), "unknownDevices": unknown})
