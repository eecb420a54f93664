"""Device measurement reports (BRIEF 2.2), published on ``dercmd.devices.reports`` keyed by
entity id: the periodic ones backends post, and an extra one after a window starts or ends.

Periodic: dispatch subscribes to the reports of every reporting backend the fleet uses, at
start-up and again every :data:`SUBSCRIBE_EVERY_S` (a backend that lost the subscription gets
it back), giving the URL of ``/callbacks/{backend}/reports`` and a bearer token: an HMAC of the
backend's name under ``DERCMD_CALLBACK_SECRET``, so every replica gives the same and any
replica takes any POST.

Extra: after a window's start reached a device, and after its end (its revert reached the
device, or, on a device that keeps windows itself, at ``endAt``), dispatch asks the backend for
a report ``DERCMD_DISPATCH_REPORT_AFTER_S`` later, unless the device's next periodic report is
due within :data:`DUE_WITHIN_S` by then (every report says when: ``nextReportAt``); the report
carries the command's id. One timer task asks, in bulk: one call per backend per wake.

What a restart loses (all of this is in memory): asks not yet made (a window that started or
ended just before gets no extra report; nor does the end of a native window delivered before
the restart), and when each device's next periodic report is due (until the periodic reports
come in again, dispatch asks even when one is due within 3 s). Each replica knows only the
periodic reports it took itself, so with several replicas some extra reports are asked for
although a periodic one was due.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dercmd import topics
from dercmd.consumer import retrying
from dercmd.events import DeviceReportV1, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.kafka import Publisher
from dercmd.protocols.common import DeviceReport
from dercmd.service import cancel_all
from dercmd.settings import DispatchSettings

from . import backends, metrics
from .backends.subscriptions import keep_subscribed

log = logging.getLogger(__name__)

#: BRIEF 2.2: no extra report when a periodic one is due within this many seconds.
DUE_WITHIN_S = 3.0
SUBSCRIBE_EVERY_S = 60.0
REPORTS_PATH = "/callbacks/{backend}/reports"


@dataclass(order=True, frozen=True, slots=True)
class _Ask:
    due: float  # epoch seconds
    seq: int
    entity_id: str = field(compare=False)
    command_id: str = field(compare=False)
    window_end: bool = field(compare=False, default=False)


class Reports:
    def __init__(self, publisher: Publisher, fleet: Fleet, settings: DispatchSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._publisher = publisher
        self._fleet = fleet
        self._secret = settings.callback_secret.encode()
        self._base_url = settings.callback_base_url.rstrip("/")
        self._after_s = settings.dispatch_report_after_s
        self._clock = clock
        self._backends: dict[str, backends.ReportingBackend] = {}
        #: Per backend, the entities whose device id is not their entity id (few, if any).
        self._aliases: dict[str, dict[str, str]] = {}
        #: Per entity, when its next periodic report is due (epoch seconds), from its last report.
        self._next_report: dict[str, float] = {}
        #: Per entity on a native-window backend, the window whose end is still to be reported.
        self._window_ends: dict[str, str] = {}
        self._asks: list[_Ask] = []
        self._sequence = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, deployed: Mapping[str, backends.DeviceBackend]) -> None:
        """Subscribe to the reports of the deployed backends that have them, and start asking."""
        for name, backend in deployed.items():
            if isinstance(backend, backends.ReportingBackend):
                self._backends[name] = backend
                self._aliases[name] = {}
                self._spawn(self._subscribe_forever(name, backend))
        for entity in self._fleet.entities.values():
            if entity.backend in self._aliases and entity.device_id != entity.id:
                self._aliases[entity.backend][entity.device_id] = entity.id
        self._spawn(self._ask_forever())

    async def aclose(self) -> None:
        await cancel_all(*self._tasks)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- authenticating the backends' POSTs ------------------------------------------------

    def token(self, backend: str) -> str:
        return hmac.new(self._secret, f"reports/{backend}".encode(), hashlib.sha256).hexdigest()[:32]

    def genuine(self, backend: str, authorization: str | None) -> bool:
        return backend in self._backends and hmac.compare_digest(authorization or "", f"Bearer {self.token(backend)}")

    async def _subscribe_forever(self, name: str, backend: backends.ReportingBackend) -> None:
        url = self._base_url + REPORTS_PATH.format(backend=name)

        def failed(exc: Exception, retry_in_s: float) -> None:  # a BackendError, or a bug
            metrics.REPORT_SUBSCRIPTION_ERRORS.labels(name).inc()
            log.warning("report subscription failed", extra={"backend": name, "error": repr(exc), "retry_in_s": retry_in_s})

        await keep_subscribed(lambda: backend.subscribe_reports(url, self.token(name)), failed, every_s=SUBSCRIBE_EVERY_S)

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, backend: str, reports: Sequence[DeviceReport], commands: Mapping[str, str] | None = None) -> list[str]:
        """Publish a backend's reports (``commands``: the command each requested one is for,
        by entity); learn when each device reports next. Returns the device ids not in the fleet."""
        events: list[tuple[topics.Topic, DeviceReportV1, str]] = []
        unknown: list[str] = []
        for report in reports:
            entity_id = self._entity_of(backend, report.device_id)
            if entity_id is None:
                unknown.append(report.device_id)
                continue
            if report.next_report_at is not None:
                self._next_report[entity_id] = report.next_report_at.timestamp()
            command_id = commands.get(entity_id) if commands else None
            events.append((topics.REPORTS, DeviceReportV1(entity_id=entity_id, at=report.at, measurements=report.measurements,
                                                          command_id=command_id), entity_id))
        await self._publisher.publish_all(events)
        metrics.REPORTS.labels("requested" if commands is not None else "periodic").inc(len(events))
        if unknown:
            metrics.REPORTS_REFUSED.labels("unknown_device").inc(len(unknown))
            log.warning("reports of unknown devices", extra={"backend": backend, "device_ids": unknown[:20], "count": len(unknown)})
        return unknown

    def _entity_of(self, backend: str, device_id: str) -> str | None:
        entity_id = self._aliases[backend].get(device_id, device_id)
        entity = self._fleet.entity(entity_id)
        return entity_id if entity is not None and entity.backend == backend and entity.device_id == device_id else None

    # -- the extra report after a window's start or end ------------------------------------

    def delivered(self, backend: str, orders: Sequence[DispatchOrderV1]) -> None:
        """Orders a backend took: a window's start or end among them earns an extra report."""
        if backend not in self._backends:
            return
        soon = self._clock() + self._after_s
        for order in orders:
            if order.revert_of is not None:
                if self._window_ends.get(order.entity_id) == order.revert_of:
                    del self._window_ends[order.entity_id]  # cleared early: the device reports now instead
                self._ask(_Ask(soon, next(self._sequence), order.entity_id, order.command_id))
            elif order.end_at is not None:
                self._ask(_Ask(soon, next(self._sequence), order.entity_id, order.command_id))
                entity = self._fleet.entity(order.entity_id)
                if entity is not None and self._fleet.keeps_windows(entity):
                    # The device ends the window itself: report it then.
                    self._window_ends[order.entity_id] = order.command_id
                    end = order.end_at.timestamp() + self._after_s
                    self._ask(_Ask(end, next(self._sequence), order.entity_id, order.command_id, window_end=True))

    def _ask(self, ask: _Ask) -> None:
        if not self._asks or ask < self._asks[0]:
            self._wake.set()
        heapq.heappush(self._asks, ask)

    async def _ask_forever(self) -> None:
        """The one timer: sleeps until the earliest ask is due, then asks for everything due."""
        while True:
            self._wake.clear()
            if not self._asks:
                await self._wake.wait()
                continue
            wait = self._asks[0].due - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            now = self._clock()
            due: list[_Ask] = []
            while self._asks and self._asks[0].due <= now:
                due.append(heapq.heappop(self._asks))
            for name, commands in self._wanted(due, now).items():
                self._spawn(self._request(name, commands))

    def _wanted(self, due: list[_Ask], now: float) -> dict[str, dict[str, str]]:
        """Per backend, the entities to ask now and the command each report is for."""
        wanted: dict[str, dict[str, str]] = defaultdict(dict)
        for ask in due:
            if ask.window_end:
                if self._window_ends.get(ask.entity_id) != ask.command_id:
                    continue  # replaced by a later window, or cleared early (reported then)
                del self._window_ends[ask.entity_id]
            next_report = self._next_report.get(ask.entity_id)
            if next_report is not None and now <= next_report <= now + DUE_WITHIN_S:
                metrics.REPORT_REQUESTS.labels("skipped").inc()
                log.debug("extra report skipped: one is due", extra={"command_id": ask.command_id, "entity_id": ask.entity_id})
                continue
            entity = self._fleet.entities[ask.entity_id]
            wanted[entity.backend][ask.entity_id] = ask.command_id
        return wanted

    async def _request(self, name: str, commands: dict[str, str]) -> None:
        try:
            reports = await self._backends[name].request_reports([self._fleet.entities[e] for e in commands])
        except Exception as exc:  # a BackendError, or a bug: the extra reports are lost either way
            metrics.REPORT_REQUESTS.labels("failed").inc(len(commands))
            log.warning("extra reports not obtained", extra={"backend": name, "error": repr(exc),
                                                             "command_ids": list(commands.values())[:20]})
            return
        metrics.REPORT_REQUESTS.labels("requested").inc(len(commands))
        await retrying(lambda: self.publish(name, reports, commands), "dispatch reports")
        missing = commands.keys() - {self._entity_of(name, r.device_id) for r in reports}
        if missing:
            metrics.REPORT_REQUESTS.labels("missing").inc(len(missing))
            log.warning("backend sent no report", extra={"backend": name, "command_ids": [commands[e] for e in missing][:20]})
