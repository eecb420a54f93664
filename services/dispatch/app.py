"""The dispatch service: a faust agent over ``dercmd.dispatch.orders`` that delivers each order
through the entity's backend, and the callback endpoint where backends report results."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any
from urllib.parse import quote

from faust.web import Request, Response, View
from pydantic import ValidationError

from dercmd import topics
from dercmd.events import CommandStatus, DispatchOrderV1, StatusEventV1, utcnow
from dercmd.fleet import Fleet
from dercmd.protocols.vendor_cloud import VendorResult
from dercmd.settings import Settings
from dercmd.streams import StreamApp

from . import backends, metrics
from .delivery import Deliveries, Outcome

log = logging.getLogger(__name__)


class Dispatcher:
    """Turns one order into at most one backend call and the status events it earns."""

    def __init__(self, app: StreamApp, fleet: Fleet) -> None:
        self._app = app
        self._fleet = fleet
        self._deliveries = Deliveries(app.redis)
        self._backends: dict[str, backends.DeviceBackend] = {}
        self._callback_base = app.settings.callback_base_url.rstrip("/")
        self._secret = app.settings.callback_secret.encode()

    def _backend(self, name: str) -> backends.DeviceBackend | None:
        if name not in self._backends:
            backend = backends.create(name, self._app.settings)
            if backend is None:
                return None
            self._backends[name] = backend
        return self._backends[name]

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()

    def signature(self, entity_id: str, command_id: str) -> str:
        """Proves a callback URL came from dispatch: nobody else can report a result."""
        message = f"{entity_id}/{command_id}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def callback_url(self, backend: str, entity_id: str, command_id: str) -> str:
        path = "/".join(quote(part, safe="") for part in (backend, entity_id, command_id))
        return f"{self._callback_base}/callbacks/{path}?sig={self.signature(entity_id, command_id)}"

    async def _emit(self, order: DispatchOrderV1, status: CommandStatus, **fields: Any) -> None:
        event = StatusEventV1(command_id=order.command_id, entity_id=order.entity_id, status=status, fence=order.fence, **fields)
        await self._app.publisher.publish(topics.STATUS, event, order.entity_id)

    async def _conclude(self, order: DispatchOrderV1, outcome: Outcome) -> None:
        """Publish the terminal status, then record it: a crash in between re-publishes it."""
        await self._emit(order, outcome.status, reason=outcome.reason, detail=outcome.detail)
        await self._deliveries.finish(order.entity_id, order.command_id, outcome)

    async def handle(self, order: DispatchOrderV1) -> None:
        extra = {"command_id": order.command_id, "entity_id": order.entity_id, "fence": order.fence}
        claim = await self._deliveries.claim(order.entity_id, order.command_id, order.fence)
        if claim == "stale":
            # A newer command took the slot before this one was claimed; arbitration has
            # already reported this one Canceled (superseded).
            metrics.ORDERS.labels("stale").inc()
            log.info("stale order dropped", extra=extra)
            return
        if claim != "claimed":
            # Seen before (redelivery, or our own retry after a failed publish): never call
            # the backend again; carry on from what the recorded state proves.
            metrics.ORDERS.labels("redelivered").inc()
            log.info("order resumed", extra={**extra, "state": claim})
            await self._continue(order, claim)
            return

        entity = self._fleet.entity(order.entity_id)
        backend = self._backend(entity.backend) if entity else None
        if entity is None or backend is None:
            detail = f"no backend {entity.backend!r} in this deployment" if entity else "entity not in the fleet"
            await self._conclude(order, Outcome(CommandStatus.FAILED, "backend_not_available", detail))
            metrics.ORDERS.labels("failed").inc()
            return

        started = time.perf_counter()
        try:
            accepted = await backend.send(order, entity, self.callback_url(backend.name, order.entity_id, order.command_id))
        except Exception as exc:
            if isinstance(exc, backends.BackendError):
                outcome = Outcome(CommandStatus.FAILED, exc.reason, exc.detail)
                log.warning("backend refused", extra={**extra, "reason": exc.reason, "detail": exc.detail})
            else:  # a backend bug: whether the device got the command is unknown
                outcome = Outcome(CommandStatus.FAILED, "delivery_unknown", repr(exc))
                log.exception("backend failed unexpectedly", extra=extra)
            metrics.BACKEND_CALLS.labels(backend.name, "error").inc()
            metrics.ORDERS.labels("failed").inc()
            # Retries with backoff come with the retry policy; today one attempt decides.
            await self._conclude(order, outcome)
            return
        finally:
            metrics.BACKEND_SECONDS.labels(backend.name).observe(time.perf_counter() - started)
        metrics.BACKEND_CALLS.labels(backend.name, "accepted").inc()
        metrics.ACCEPT_TO_SENT_SECONDS.observe((utcnow() - order.accepted_at).total_seconds())
        metrics.ORDERS.labels("sent").inc()
        log.info("sent", extra={**extra, "backend": backend.name, "backend_ref": accepted.backend_ref})
        state = await self._deliveries.accepted(order.entity_id, order.command_id)
        if accepted.confirmation is backends.Confirmation.SYNC and state == "accepted":
            state = f"result:{Outcome(CommandStatus.SUCCEEDED).encode()}"
        await self._continue(order, state)

    async def _continue(self, order: DispatchOrderV1, state: str) -> None:
        """Take a command from its recorded delivery state to wherever it can get now."""
        if state == "inflight":
            # An attempt died during the backend call: the device may or may not have it,
            # and at most once forbids asking again.
            await self._conclude(order, Outcome(CommandStatus.FAILED, "delivery_unknown", "dispatch stopped during the backend call"))
        elif state == "accepted":
            await self._emit(order, CommandStatus.SENT)
            after = await self._deliveries.sent(order.entity_id, order.command_id)
            if after.startswith("result:"):  # the callback came first and was held back
                await self._conclude(order, Outcome.decode(after.removeprefix("result:")))
        elif state == "sent":
            await self._emit(order, CommandStatus.SENT)  # the result comes by callback
        elif state.startswith("result:"):
            await self._emit(order, CommandStatus.SENT)
            await self._conclude(order, Outcome.decode(state.removeprefix("result:")))
        elif state.startswith("done:"):
            outcome = Outcome.decode(state.removeprefix("done:"))
            await self._emit(order, outcome.status, reason=outcome.reason, detail=outcome.detail)

    async def on_result(self, entity_id: str, command_id: str, outcome: Outcome) -> str:
        """A backend's asynchronous result for a command this service sent."""
        state = await self._deliveries.result(entity_id, command_id, outcome)
        metrics.CALLBACKS.labels(outcome.status.value).inc()
        if state == "emit" or state.startswith("done:"):
            # "done:" too: a repeated callback after a failed publish must publish again
            # (the event id makes a second copy harmless); it carries the recorded outcome.
            recorded = outcome if state == "emit" else Outcome.decode(state.removeprefix("done:"))
            event = StatusEventV1(
                command_id=command_id, entity_id=entity_id, status=recorded.status, reason=recorded.reason, detail=recorded.detail
            )
            await self._app.publisher.publish(topics.STATUS, event, entity_id)
        log.info("backend result", extra={"command_id": command_id, "entity_id": entity_id, "result": outcome.status.value, "state": state})
        return state


def build(settings: Settings) -> StreamApp:
    app = StreamApp("dispatch", settings, settings.dispatch_port)
    dispatcher = Dispatcher(app, Fleet.load(settings.fleet_file))

    @app.agent(app.topic_of(topics.ORDERS), name="dispatch")
    async def dispatch(stream: Any) -> None:
        async for event in stream.events():
            await app.guarded(topics.ORDERS, event, dispatcher.handle)

    @app.page("/callbacks/vendor-cloud/{entity_id}/{command_id}")
    class VendorCloudCallback(View):
        async def post(self, request: Request, entity_id: str, command_id: str) -> Response:
            if not hmac.compare_digest(request.query.get("sig", ""), dispatcher.signature(entity_id, command_id)):
                return self.json({"key": "invalid_signature"}, status=403)
            try:
                result = VendorResult.model_validate_json(await self.read_request_content(request))
            except ValidationError as exc:
                return self.json({"key": "invalid_result", "detail": str(exc)}, status=400)
            if result.command_id != command_id:
                return self.json({"key": "command_id_mismatch"}, status=400)
            outcome = (
                Outcome(CommandStatus.SUCCEEDED)
                if result.result == "SUCCEEDED"
                else Outcome(CommandStatus.FAILED, "device_failed", result.message)
            )
            state = await dispatcher.on_result(entity_id, command_id, outcome)
            if state == "missing":
                return self.json({"key": "unknown_command"}, status=404)
            return self.json({"state": state})

    app.closers.append(dispatcher.aclose)
    return app
