"""Backend ``ev-aggregator``: an EV-cloud aggregator that steers vehicles of several makes
through one API (see :mod:`dercmd.protocols.ev_aggregator`). Each command is one action,
asked for with the command id as its idempotency key, so the aggregator never makes two
actions of one command, and every action it reports names the command it belongs to: no
mapping from action ids to commands is kept anywhere.

The action's outcome arrives two ways, and whichever comes first counts (``context.report``
goes through the command's delivery state, so a second one changes nothing):

- by **webhook**: dispatch subscribes ``/callbacks/ev-aggregator`` (this package's route on
  dispatch's server, any replica) at start-up and every minute; a POST counts only if its
  ``X-Signature`` is the HMAC of its raw body under ``DERCMD_EV_AGGREGATOR_WEBHOOK_SECRET``;
- by **polling**, for webhooks that never come: every accepted (or unknown) delivery is put
  in Redis (:mod:`dercmd.state.ev_pending`), and each replica polls the ones due by
  idempotency key every ``DERCMD_EV_AGGREGATOR_POLL_INTERVAL_S``, under a lease so that replicas do not poll one
  action together. A webhook's result takes the action out of polling.

A call carries one command (the API takes one action per request), so dispatch's rate limit
(``DERCMD_EV_AGGREGATOR_RATE_PER_S``) counts actions, and its call slots are the requests in
flight. A 404 (unknown vehicle), 409 (refused) or 422 is Refused; a 429 (with its
Retry-After), a 5xx or no connection is NotDelivered; a timeout or a dropped connection after
sending is DeliveryUnknown, which the backend resolves (:meth:`EvAggregatorBackend.outcomes`:
the action by its idempotency key; none means it was never made, and sending again with the
same key cannot make a second). A call of which nothing was taken fails as a whole, so that
dispatch's circuit breaker and shared 429 pause see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from dercmd.events import CommandType
from dercmd.fleet import Entity, EntityKind
from dercmd.protocols.common import DeviceApiError
from dercmd.protocols.ev_aggregator import (
    ACTION_TYPES,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Action,
    EvAggregatorClient,
    EvAggregatorSettings,
    WebhookEvent,
    refusal,
)
from dercmd.state.ev_pending import PendingActions
from dercmd.state.webhooks import Webhooks
from dercmd.web import error

from ..base import (
    Accepted,
    BackendContext,
    BackendError,
    Capabilities,
    CommandOutcome,
    Confirmation,
    Delivery,
    DeliveryUnknown,
    DeviceResult,
    Finding,
    NotDelivered,
    Query,
    Refused,
    register,
)
from ..bulk_rest import translate, translated
from ..subscriptions import keep_subscribed
from ... import metrics

log = logging.getLogger(__name__)

NAME = "ev-aggregator"
#: Path on dispatch's server where the aggregator posts its webhooks.
CALLBACK_PATH = "/callbacks/ev-aggregator"
#: Commands one call carries: one action per request (several would go concurrently, one
#: vehicle's in order, but dispatch's rate limit and circuit count calls).
MAX_BATCH = 1
#: The webhook subscription is put again this often (an aggregator that lost it gets it back).
SUBSCRIBE_EVERY_S = 60.0
#: Most actions one replica polls per tick, and at once.
POLL_BATCH = 200
POLL_CONCURRENCY = 16
#: Longest ``aclose`` waits for the background loops to end.
CLOSE_WAIT_S = 5.0

#: Vehicles, charging started and stopped (the aggregator's two actions).
CAPABILITIES = Capabilities(types=frozenset({CommandType.START_CHARGING, CommandType.STOP_CHARGING}),
                            kinds=frozenset({EntityKind.EV}))

_FINDINGS = {"CONFIRMED": Finding.SUCCEEDED, "FAILED": Finding.FAILED, "PENDING": Finding.PENDING}


class EvAggregatorBackend:
    name = NAME
    supported_types = CAPABILITIES.types
    max_batch = MAX_BATCH

    def __init__(self, client: EvAggregatorClient, context: BackendContext, settings: EvAggregatorSettings) -> None:
        self._client = client
        self._context = context
        self._settings = settings
        self._webhook_url = context.callback_base_url.rstrip("/") + CALLBACK_PATH
        #: The fleet's vehicles on this backend, by the id the aggregator knows them by.
        self._vehicles: dict[str, Entity] = {e.device_id: e for e in context.fleet.entities.values() if e.backend == NAME}
        # Polled until the status service's sweeper would ask about the command itself.
        self.pending = PendingActions(
            context.redis, first_poll_s=settings.poll_interval_s, give_up_s=context.settings.deadline_sent_s,
        )
        self._webhooks = Webhooks(context.redis, NAME)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.router = self._webhook_router()

    async def start(self) -> None:
        """Subscribe the webhook and start polling, both in the background: an aggregator that
        is down at start-up delays neither dispatch nor the other backends."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscribe_forever(), name="ev-aggregator-webhook"),
            loop.create_task(self._poll_forever(), name="ev-aggregator-poll"),
        ]

    async def aclose(self) -> None:
        """Stop the loops. A cancel alone is not enough: redis-py's asyncio client (8.1) swallows
        a cancel that lands inside a call about a third of the time (a task looping over one
        command, cancelled at random: 66 of 200 kept running; httpx passes every cancel on),
        so the loops also stop at ``_closed``, and the wait is bounded."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)
        await self._client.aclose()

    # -- sending -------------------------------------------------------------------------

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]:
        """One action per delivery, concurrently across vehicles and in order within one."""
        answers: list[Accepted | BackendError | None] = [None] * len(deliveries)
        by_vehicle: dict[str, list[int]] = defaultdict(list)
        for i, delivery in enumerate(deliveries):
            by_vehicle[delivery.entity.device_id].append(i)

        async def one_vehicle(positions: list[int]) -> None:
            for i in positions:
                answers[i] = await self._send_one(deliveries[i])

        await asyncio.gather(*(one_vehicle(p) for p in by_vehicle.values()))
        # Wait for what may have reached the aggregator: accepted ones, and unknown ones
        # (the answer was lost; the action may exist, and then its outcome counts).
        wait = [(d.entity.id, d.order.command_id) for d, a in zip(deliveries, answers, strict=True)
                if isinstance(a, Accepted | DeliveryUnknown)]
        try:
            await self.pending.add(wait)
        except Exception as exc:  # Redis: the webhook still comes, and the sweeper asks at the deadline
            log.warning("pending actions not recorded", extra={"backend": NAME, "error": repr(exc), "commands": len(wait)})
        done = [a for a in answers if a is not None]
        kinds = {type(a) for a in done}
        if len(kinds) == 1 and kinds <= {NotDelivered, DeliveryUnknown}:
            # Nothing of the call was taken, the same way: it failed as a whole (the longest
            # Retry-After asked for stands for all).
            raise max(done, key=lambda a: getattr(a, "retry_after_s", None) or 0.0)  # type: ignore[arg-type]
        return done

    async def _send_one(self, delivery: Delivery) -> Accepted | BackendError:
        action_type = ACTION_TYPES.get(delivery.order.type.value)
        if action_type is None:
            return Refused("unsupported_type", f"{delivery.order.type.value} is not an EV-aggregator action")
        try:
            action = await self._client.create_action(delivery.entity.device_id, action_type, delivery.order.command_id)
        except DeviceApiError as exc:
            return translate(exc)
        return Accepted(Confirmation.ASYNC, action.id)

    # -- outcomes ------------------------------------------------------------------------

    async def outcomes(self, queries: Sequence[Query]) -> list[CommandOutcome]:
        """Each command's action, found by its idempotency key: CONFIRMED is SUCCEEDED, FAILED
        FAILED, PENDING PENDING; no action is UNKNOWN (the request never made one)."""
        limit = asyncio.Semaphore(POLL_CONCURRENCY)

        async def one(query: Query) -> CommandOutcome:
            async with limit:
                action = await self._client.action_by_key(query.command_id)
            if action is None:
                return CommandOutcome(Finding.UNKNOWN)
            return CommandOutcome(_FINDINGS[action.state], action.failure_reason)

        with translated():
            return list(await asyncio.gather(*(one(q) for q in queries)))

    # -- results: webhooks and polling ---------------------------------------------------

    def _webhook_router(self) -> APIRouter:
        router = APIRouter()

        @router.post(CALLBACK_PATH, include_in_schema=False)
        async def ev_aggregator_webhook(request: Request) -> JSONResponse:
            body = await request.body()
            webhook_id = request.headers.get(ID_HEADER)
            refused = refusal(self._settings.webhook_secret, body, request.headers.get(SIGNATURE_HEADER),
                              request.headers.get(TIMESTAMP_HEADER), webhook_id, now=time.time(),
                              tolerance_s=self._settings.webhook_tolerance_s)
            if refused is not None:
                metrics.WEBHOOKS_REFUSED.labels(NAME, refused).inc()
                message = (f"{SIGNATURE_HEADER} does not sign this id, time and body" if refused == "invalid_signature"
                           else f"{TIMESTAMP_HEADER} is more than {self._settings.webhook_tolerance_s:g} s from now")
                return error(refused, message, 403)
            assert webhook_id is not None
            if await self._webhooks.seen(webhook_id):
                # The same webhook again inside its window (a replay, or a retry after an
                # answer that was lost): taken once already, so nothing changes.
                metrics.WEBHOOKS_REFUSED.labels(NAME, "replayed").inc()
                return JSONResponse({"state": "replayed"})
            try:
                event = WebhookEvent.model_validate_json(body)
            except ValidationError as exc:
                return error("invalid_event", str(exc)[:2000], 400)
            result = self._result(event.action)
            if result is None:
                # Nothing to report (still pending, not a vehicle or key of ours): a 2xx all the
                # same, or the aggregator would send it again and again.
                return JSONResponse({"state": "ignored"})
            [state] = await self._context.report([result])
            await self._webhooks.taken(webhook_id, 2 * self._settings.webhook_tolerance_s)
            with contextlib.suppress(Exception):  # left in: a later poll reports it again, harmlessly
                await self.pending.remove([(result.entity_id, result.command_id)])
            return JSONResponse({"state": state})

        return router

    def _result(self, action: Action) -> DeviceResult | None:
        """The device's result an action carries, if it has one and is about one of our commands."""
        entity = self._vehicles.get(action.vehicle_id)
        if action.state == "PENDING" or action.idempotency_key is None or entity is None:
            return None
        return DeviceResult(entity.id, action.idempotency_key, action.state == "CONFIRMED", action.failure_reason)

    async def poll_once(self) -> int:
        """Ask about the pending actions due now (leased from every other replica); report
        those that ended. Returns how many were asked about."""
        due = await self.pending.take(POLL_BATCH, self._settings.poll_interval_s)
        if not due:
            return 0
        limit = asyncio.Semaphore(POLL_CONCURRENCY)

        async def ask(command_id: str) -> Action | None | Exception:
            async with limit:
                try:
                    return await self._client.action_by_key(command_id)
                except DeviceApiError as exc:
                    return exc  # asked again when the lease runs out

        actions = await asyncio.gather(*(ask(c) for _, c in due))
        results: list[DeviceResult] = []
        settled: list[tuple[str, str]] = []
        for (entity_id, command_id), action in zip(due, actions, strict=True):
            if isinstance(action, Exception):
                log.warning("poll failed", extra={"backend": NAME, "command_id": command_id, "error": str(action)})
            elif action is None:
                settled.append((entity_id, command_id))  # an unknown delivery that made no action
            elif action.state != "PENDING":
                results.append(DeviceResult(entity_id, command_id, action.state == "CONFIRMED", action.failure_reason))
                settled.append((entity_id, command_id))
        if results:
            await self._context.report(results)
        await self.pending.remove(settled)
        return len(due)

    async def _poll_forever(self) -> None:
        tick_s = min(max(self._settings.poll_interval_s / 2, 0.05), 1.0)
        while not self._closed:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or dispatch's report failed: the leases bring them back
                log.warning("polling failed", extra={"backend": NAME, "error": repr(exc)})
            await asyncio.sleep(tick_s)

    async def _subscribe_forever(self) -> None:
        def failed(exc: Exception, retry_in_s: float) -> None:  # the aggregator, or a bug
            log.warning("webhook subscription failed", extra={"backend": NAME, "error": repr(exc), "retry_in_s": retry_in_s})

        await keep_subscribed(lambda: self._client.subscribe_webhook(self._webhook_url, self._settings.webhook_secret), failed,
                              every_s=SUBSCRIBE_EVERY_S, running=lambda: not self._closed)


@register(NAME, EvAggregatorSettings, CAPABILITIES)
def _create(context: BackendContext) -> EvAggregatorBackend:
    settings = EvAggregatorSettings()
    client = EvAggregatorClient(settings.base_url(context.settings), settings.client_id, settings.client_secret,
                                timeout_s=settings.timeout_s)
    return EvAggregatorBackend(client, context, settings)
