"""The call pool: a batch of orders grouped by backend and cut into calls of up to the
backend's batch size, each call a task that waits for whatever earlier work still has one of
its entities (in order within an entity, in parallel across them), is held until its
``notBefore`` where it has one, and then takes its orders through attempts until each is
sent, concluded or past its deadline."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta
from typing import Any

from dercmd.clock import SharedClock
from dercmd.consumer import Item, retrying
from dercmd.events import DeliveryCheckV1, DispatchOrderV1
from dercmd.settings import DispatchSettings
from dercmd.state.delivery import Stage, Step, Transition

from . import backends, metrics
from .attempt import EXPIRED, Attempt, Failure, Sender
from .checks import Checks
from .outcomes import Outcomes, first_of_each
from .pool import BackendPool
from .reports import Reports
from .resilience import RetryPolicy

log = logging.getLogger(__name__)


def _expired_after(error: backends.BackendError) -> backends.BackendError:
    """Why an order ends at its ``expiresAt`` after attempts the backend did not take."""
    return backends.NotDelivered(EXPIRED.reason, f"{EXPIRED.detail} (last attempt: {error.reason})")


class Calls:
    def __init__(self, settings: DispatchSettings, pool: BackendPool, sender: Sender, outcomes: Outcomes, checks: Checks,
                 reports: Reports, clock: SharedClock) -> None:
        self._settings = settings
        self._pool = pool
        self._sender = sender
        self._outcomes = outcomes
        self._checks = checks
        self._reports = reports
        self._clock = clock
        self._retry = RetryPolicy(settings.dispatch_retry_for_s, settings.dispatch_retry_base_ms / 1000,
                                  settings.dispatch_retry_max_ms / 1000)
        #: Per entity, the delivery work that last took one of its commands: a later command
        #: of the entity is sent only after it. Entries leave when their work is done.
        self._tails: dict[str, asyncio.Future[Any]] = {}
        #: Per notBefore, the held calls that woke and have not sent yet (see ``_call``).
        self._sending: dict[datetime, _Countdown] = {}

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
            groups[(self._pool.name_for(event.entity_id), event.not_before)].append(event)
        calls: list[asyncio.Future[None]] = [asyncio.ensure_future(self._checks.check(checks))] if checks else []
        for (name, _), orders in groups.items():
            backend = self._pool.backends[name] if name is not None else None
            size = max(1, min(backend.max_batch, self._settings.dispatch_backend_batch)) if backend else len(orders)
            calls += [self._start(backend, orders[i : i + size]) for i in range(0, len(orders), size)]
        return _all(calls)

    async def held_sends(self) -> None:
        """Wait for the held calls sending now (a window's start): results can wait a moment."""
        for sending in list(self._sending.values()):
            await sending.wait()

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
            await asyncio.sleep(self._clock.seconds_until(not_before))
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
        unique = first_of_each(orders)
        if len(unique) < len(orders):
            # The same order twice in one call (a redelivered copy): the first one speaks for both.
            metrics.ORDERS.labels("redelivered").inc(len(orders) - len(unique))
            orders = unique
        attempt = 0
        while orders:
            try:
                result = await self._sender.attempt(orders, backend)
            finally:
                if sending is not None:
                    sending.done()  # sent (or failed to): the others need not wait for it
            if sending is not None:
                await sending.wait()
                self._sending = {t: c for t, c in self._sending.items() if not c.finished}
                sending = None
            # From here on every step is idempotent, so a failed dependency is simply retried:
            # nothing may leave a delivered command without its outcome.
            if result.expired:
                await self._expire(result, backend)
            await self._record(result)
            if result.unknown and backend is not None:
                # What may have reached the device is asked about only once the request can no
                # longer be on its way (a slow backend still working on it would answer
                # "never got it" and the command would go twice).
                await asyncio.sleep(self._settings.dispatch_unknown_grace_s)
                resolved = await self._checks.resolve(backend, result.unknown)
                await self._record(resolved)
                result.merge(resolved)
            if result.accepted and backend is not None:
                self._reports.delivered(backend.name, [o for o, _ in result.accepted])
            if backend is None or not result.again:
                return
            orders = await self._again(backend, result.again, attempt)
            attempt += 1

    async def _expire(self, result: Attempt, backend: backends.DeviceBackend | None) -> None:
        """Orders whose ``expiresAt`` passed before their turn: ``Failed: expired``, never sent.
        One an attempt left in flight is asked about like any unknown delivery."""
        metrics.ORDERS.labels("expired").inc(len(result.expired))
        inflight = await self._outcomes.give_up(result.expired)
        if backend is not None:
            result.unknown += inflight
        else:
            result.resumed += [(o, Transition(Step.FOUND, Stage.INFLIGHT)) for o, _ in inflight]

    async def _record(self, result: Attempt) -> None:
        await retrying(lambda: self._outcomes.record(result.accepted, result.failed, result.resumed), "dispatch results")

    async def _again(self, backend: backends.DeviceBackend, again: list[Failure], attempt: int) -> list[DispatchOrderV1]:
        """The orders to send again, after the backoff. Those whose deadline comes before the
        next attempt end Failed: past the retry deadline at once (as they always have), past
        the caller's ``expiresAt`` at that moment (``Failed: expired``, within the backoff)."""
        now = self._clock.now()
        retry_after = max((e.retry_after_s or 0.0 for _, e in again if isinstance(e, backends.NotDelivered)), default=0.0)
        wait_s = self._retry.backoff_s(attempt, retry_after)
        next_try = now + timedelta(seconds=wait_s)
        expiring = [(o, e) for o, e in again if o.expires_at is not None and o.expires_at < next_try
                    and o.expires_at <= self._retry.deadline(o)]
        expiring_ids = {o.command_id for o, _ in expiring}
        late = [(o, e) for o, e in again if o.command_id not in expiring_ids and self._retry.deadline(o) < next_try]
        if late:
            await self._outcomes.give_up(late)
        gone = expiring_ids | {o.command_id for o, _ in late}
        keep = [o for o, _ in again if o.command_id not in gone]
        for _, error in again:
            metrics.RETRIES.labels(backend.name, error.reason).inc()
        if keep:
            log.info("sending again", extra={"backend": backend.name, "commands": len(keep), "wait_s": round(wait_s, 3),
                                             "command_ids": [o.command_id for o in keep][:20]})
        await asyncio.gather(self._expire_at_deadline(expiring), asyncio.sleep(wait_s if keep else 0))
        return keep

    async def _expire_at_deadline(self, expiring: list[Failure]) -> None:
        """Each order ends ``Failed: expired`` at its ``expiresAt`` (never earlier: until then
        it was still the caller's to have)."""
        for when in sorted({o.expires_at for o, _ in expiring if o.expires_at is not None}):
            await asyncio.sleep(max(0.0, self._clock.seconds_until(when)))
            due = [(o, _expired_after(e)) for o, e in expiring if o.expires_at == when]
            result = Attempt(expired=due)
            await self._expire(result, None)  # (they are not in flight: the backend did not take them)
            await self._record(result)


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
