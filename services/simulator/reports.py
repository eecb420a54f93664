"""A simulated backend's measurement reports (see :mod:`dercmd.protocols.common`): periodic
ones pushed to whoever subscribed, and extra ones on request.

Every measuring device reports once per interval, at its own phase of it (device ``i`` of
``n`` at ``i/n`` of the interval), so a fleet's reports are spread evenly over the interval.
One task sends them: it wakes at most every ``tick`` and posts what came due meanwhile in one
POST (up to 500 reports each), never one POST per device. A POST that fails is counted and
logged; those reports are lost, and the next ones come an interval later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx

from dercmd.events import utcnow
from dercmd.protocols.common import MAX_REPORTS_PER_POST, ReportSubscription

from . import metrics
from .devices import SimDevice

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, backend: str, devices: dict[str, SimDevice], interval_s: float, http: httpx.AsyncClient) -> None:
        """``devices``: the measuring devices, by the id the backend knows them by."""
        self._backend = backend
        self._devices = devices
        self._order = sorted(devices)
        self._index = {device_id: i for i, device_id in enumerate(self._order)}
        self._interval_s = interval_s
        self._tick_s = max(0.05, min(1.0, interval_s / 20))
        self._http = http
        self._subscription: ReportSubscription | None = None
        self._epoch = 0.0  # loop time at which the first cycle began
        self._task: asyncio.Task[None] | None = None
        self._posts: set[asyncio.Task[None]] = set()
        self._periodic = metrics.REPORTS.labels(backend, "periodic")
        self._requested = metrics.REPORTS.labels(backend, "requested")

    @property
    def periodic(self) -> bool:
        return self._interval_s > 0 and bool(self._order)

    def subscribe(self, subscription: ReportSubscription) -> None:
        """Periodic reports go to ``subscription`` from now on (the first one starts them)."""
        self._subscription = subscription
        if self.periodic and self._task is None:
            self._epoch = asyncio.get_running_loop().time()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._backend}-reports")

    def request(self, device_ids: Sequence[str]) -> list[dict[str, Any]]:
        """A report now from each known measuring device among ``device_ids``."""
        loop_now, now = asyncio.get_running_loop().time(), utcnow()
        reports = [self._report(d, now, self._next_due(d, loop_now), loop_now) for d in device_ids if d in self._devices]
        self._requested.inc(len(reports))
        return reports

    def _phase(self, i: int) -> float:
        return i * self._interval_s / len(self._order)

    def _next_due(self, device_id: str, loop_now: float) -> float | None:
        """Loop time of the device's next periodic report, or None if it reports none."""
        if self._task is None:
            return None
        start = self._epoch + self._phase(self._index[device_id])
        return start + self._interval_s * max(0, math.floor((loop_now - start) / self._interval_s) + 1)

    def _report(self, device_id: str, now: datetime, next_due: float | None, loop_now: float) -> dict[str, Any]:
        report: dict[str, Any] = {"deviceId": device_id, "at": now.isoformat(), "measurements": self._devices[device_id].measurements(now)}
        if next_due is not None:
            report["nextReportAt"] = (now + timedelta(seconds=next_due - loop_now)).isoformat()
        return report

    async def _run(self) -> None:
        """Walk the devices in phase order, cycle after cycle, sending what is due at each wake."""
        loop = asyncio.get_running_loop()
        n, interval = len(self._order), self._interval_s
        cursor, cycle = 0, self._epoch
        while True:
            loop_now, now = loop.time(), utcnow()
            if loop_now - cycle > 2 * interval:  # the loop was stalled: skip the cycles missed
                cycle += interval * (math.floor((loop_now - cycle) / interval) - 1)
            due: list[dict[str, Any]] = []
            while len(due) < n and cycle + self._phase(cursor) <= loop_now:
                due.append(self._report(self._order[cursor], now, cycle + self._phase(cursor) + interval, loop_now))
                cursor += 1
                if cursor == n:
                    cursor, cycle = 0, cycle + interval
            if due and self._subscription is not None:
                self._periodic.inc(len(due))
                for start in range(0, len(due), MAX_REPORTS_PER_POST):
                    task = loop.create_task(self._post(self._subscription, due[start : start + MAX_REPORTS_PER_POST]))
                    self._posts.add(task)
                    task.add_done_callback(self._posts.discard)
            await asyncio.sleep(max(self._tick_s, cycle + self._phase(cursor) - loop.time()))

    async def _post(self, subscription: ReportSubscription, reports: list[dict[str, Any]]) -> None:
        metrics.REPORT_POSTS.labels(self._backend).inc()
        try:
            response = await self._http.post(
                subscription.url,
                json={"reports": reports},
                headers={"Authorization": f"Bearer {subscription.token}"},
            )
            error = None if response.is_success else f"HTTP {response.status_code}: {response.text[:300]}"
        except httpx.HTTPError as exc:
            error = repr(exc)
        if error:
            metrics.REPORT_ERRORS.labels(self._backend).inc(len(reports))
            log.warning("reports not delivered", extra={"backend": self._backend, "url": subscription.url, "error": error,
                                                        "reports": len(reports)})

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._posts) if t is not None]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
