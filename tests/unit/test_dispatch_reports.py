"""dispatch's extra reports after a window's start and end (BRIEF 2.2), against a scripted
backend: skipped when a periodic report is due within 3 s, asked in bulk otherwise, and at the
end of a window a native device keeps, unless that window was replaced or cleared first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from dercmd import topics
from dercmd.dispatch.reports import Reports
from dercmd.events import CommandType, DeviceReportV1, DispatchOrderV1, Event, revert_id, utcnow
from dercmd.fleet import Entity, Fleet
from dercmd.protocols.common import DeviceReport
from dercmd.settings import Settings

FLEET = Fleet.model_validate({"entities": {
    **{f"pv-{name}": {"kind": "PV", "vendor": "v", "backend": "cloud"} for name in ("soon", "later", "past", "unknown")},
    "box-1": {"kind": "PV", "vendor": "v", "backend": "native-window", "vendorDeviceId": "BOX-1"},
}})


class Backend:
    """Answers every request for reports at once, and remembers who was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.changed = asyncio.Event()

    async def subscribe_reports(self, url: str, token: str) -> None:
        pass

    async def request_reports(self, entities: Sequence[Entity]) -> list[DeviceReport]:
        self.asked.append([e.id for e in entities])
        self.changed.set()
        return [DeviceReport(device_id=e.device_id, at=utcnow(), measurements={"activePowerW": 1}) for e in entities]


class Publisher:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish_all(self, records: Sequence[tuple[topics.Topic, Event, str]]) -> None:
        self.events += [event for _, event, _ in records]


@pytest.fixture
async def reports() -> AsyncIterator[tuple[Reports, Backend, Publisher]]:
    backend, publisher = Backend(), Publisher()
    subject = Reports(publisher, FLEET, Settings(dispatch_report_after_s=0))  # type: ignore[arg-type]
    subject.start({"cloud": backend, "native-window": backend})  # type: ignore[dict-item]
    yield subject, backend, publisher
    await subject.aclose()


def window(entity_id: str, command_id: str, length_s: float) -> DispatchOrderV1:
    now = utcnow()
    return DispatchOrderV1(command_id=command_id, entity_id=entity_id, type=CommandType.LIMIT_PRODUCTION_POWER, percentage=50,
                           fence=1, accepted_at=now, ordered_at=now, start_at=now, end_at=now + timedelta(seconds=length_s))


async def asked(backend: Backend, count: int) -> list[list[str]]:
    async with asyncio.timeout(10):
        while len(backend.asked) < count:
            backend.changed.clear()
            await backend.changed.wait()
    return backend.asked


def skipped() -> float:
    return REGISTRY.get_sample_value("dercmd_dispatch_report_requests_total", {"result": "skipped"}) or 0.0


async def test_an_extra_report_is_asked_unless_a_periodic_one_is_due_within_3_s(reports: Any) -> None:
    subject, backend, publisher = reports
    now = utcnow()
    periodic = [DeviceReport(device_id=f"pv-{name}", at=now, next_report_at=now + timedelta(seconds=due), measurements={})
                for name, due in (("soon", 2), ("later", 5), ("past", -1))]
    await subject.publish("cloud", periodic)
    before = skipped()

    subject.delivered("cloud", [window(f"pv-{name}", f"w-{name}", 3600) for name in ("soon", "later", "past", "unknown")])

    [batch] = await asked(backend, 1)  # one call for all of them
    assert sorted(batch) == ["pv-later", "pv-past", "pv-unknown"]
    assert skipped() == before + 1
    extra = [e for e in publisher.events if isinstance(e, DeviceReportV1) and e.command_id]
    assert sorted((e.entity_id, e.command_id) for e in extra) == [
        ("pv-later", "w-later"), ("pv-past", "w-past"), ("pv-unknown", "w-unknown")
    ]


async def test_a_native_window_is_reported_at_its_end_unless_replaced_or_cleared_first(reports: Any) -> None:
    subject, backend, publisher = reports
    subject.delivered("native-window", [window("box-1", "a", 0.3)])
    await asked(backend, 1)  # a's start
    subject.delivered("native-window", [window("box-1", "b", 0.6)])  # replaces a before a ends
    await asked(backend, 3)  # b's start, then b's end: a's end, due before it, was dropped
    assert backend.asked == [["box-1"]] * 3
    assert [e.command_id for e in publisher.events] == ["a", "b", "b"]

    c = window("box-1", "c", 0.3)
    subject.delivered("native-window", [c])
    lift = c.model_copy(update={"command_id": revert_id("c"), "revert_of": "c", "start_at": None, "end_at": None, "percentage": 100})
    subject.delivered("native-window", [lift])  # cleared early: its revert is reported instead
    await asked(backend, 4)
    assert "box-1" not in subject._window_ends
    assert publisher.events[-1].command_id == revert_id("c")  # one ask for the start and the revert, due together
