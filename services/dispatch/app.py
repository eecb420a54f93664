"""The dispatch service: delivers ``dercmd.dispatch.orders`` through the entities' backends,
in parallel across entities and in order within one, and takes the results backends report.

:class:`Dispatcher` is the wiring; the work is in focused modules, in the order an order meets
them:

- :mod:`.calls`: a batch grouped by backend and cut into calls, per-entity order, calls held
  until their ``notBefore``, and the retry loop with backoff and deadline;
- :mod:`.pool`: the backends, each with its call slots, rate limit and circuit breaker;
- :mod:`.attempt`: one claim (at most once; the fence checked just before sending) and one
  backend call, its answers sorted;
- :mod:`.outcomes`: each command's delivery state moved on (typed transitions of
  :mod:`dercmd.state.delivery`) and the status events it earns published;
- :mod:`.checks`: deliveries whose fate is unknown and delivery checks (a command left
  ``Sent`` past its deadline), asked of the backends;
- :mod:`.reports`: measurement reports (periodic, and the extra one after a window starts or
  ends).

The consumer fetches on meanwhile (the handler returns before the backends answer), so a slow
backend delays only its own entities' deliveries; offsets are committed once a batch and every
batch before it are done, so a dead backend does hold the commits (and, past 64 batches, the
fetching) of the partitions it shares with others.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from dercmd import topics
from dercmd.clock import SharedClock
from dercmd.fleet import Fleet
from dercmd.protocols.common import DeviceReports
from dercmd.service import Service
from dercmd.settings import DispatchSettings
from dercmd.state.delivery import Deliveries

from . import backends, metrics
from .attempt import Sender
from .calls import Calls
from .checks import Checks
from .outcomes import Outcomes, device_result
from .pool import BackendPool
from .reports import REPORTS_PATH, Reports
from .tokens import ResultTokens

log = logging.getLogger(__name__)

#: How many batches the consumer may hand out before the oldest has finished.
MAX_PENDING_BATCHES = 64


class Dispatcher:
    """Turns orders into at most one backend delivery each and the status events they earn."""

    def __init__(self, service: Service, fleet: Fleet) -> None:
        settings = service.settings
        self.clock = SharedClock(service.redis)
        self.tokens = ResultTokens(settings.callback_secret)
        self.reports = Reports(service.publisher, fleet, settings)
        self.context = backends.BackendContext(
            settings=settings, fleet=fleet, redis=service.redis, callback_base_url=settings.callback_base_url,
            token=self.tokens.token, entity_of=self.tokens.entity_of, report=self.on_results,
        )
        deliveries = Deliveries(service.redis)
        self._pool = BackendPool(settings, fleet, self.context)
        self._outcomes = Outcomes(deliveries, service.publisher)
        checks = Checks(self._pool, deliveries, self._outcomes, service.publisher, fleet)
        sender = Sender(self._pool, deliveries, self._outcomes, fleet, self.tokens, now=self.clock.now)
        self._calls = Calls(settings, self._pool, sender, self._outcomes, checks, self.reports, self.clock)
        self.handle = self._calls.handle

    def make_backends(self) -> list[backends.DeviceBackend]:
        """The backends the fleet uses (registered ones; an entity of any other fails with
        ``backend_not_available``)."""
        return self._pool.fleet_backends()

    async def start(self) -> None:
        """Start the backends, and subscribe to their reports."""
        for backend in self.make_backends():
            await backend.start()
        self.reports.start(self._pool.backends)
        await self.clock.start()

    async def aclose(self) -> None:
        await self.clock.stop()
        await self.reports.aclose()
        await self._pool.aclose()

    async def on_results(self, reported: Sequence[backends.DeviceResult]) -> list[str]:
        """Backends' asynchronous results: publishes those whose Sent is out; returns each
        one's delivery state as the short text the backend's route answers with."""
        results = [(r.entity_id, r.command_id, device_result(r.succeeded, r.message)) for r in reported]
        for status, count in Counter(outcome.status.value for _, _, outcome in results).items():
            metrics.CALLBACKS.labels(status).inc(count)
        await self._calls.held_sends()  # a window's start goes first: results can wait a moment
        return [t.label for t in await self._outcomes.apply_results(results)]


def build(settings: DispatchSettings) -> Service:
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
