"""dispatch against the simulator over real HTTP, both served by uvicorn in the test's event
loop, on a real Redis and broker: windows to native-window devices and limits to vendor-cloud
ones, what devices received and hold, measurement reports (periodic and the extra one after a
window's start and end), and delivery checks of commands left Sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY

from dercmd import topics
from dercmd.state import keys as redis_keys
from dercmd.consumer import Item
from dercmd.dispatch.app import Dispatcher, add_routes
from dercmd.state.delivery import Deliveries
from dercmd.events import (
    CommandStatus,
    CommandType,
    DeliveryCheckV1,
    DeviceReportV1,
    DispatchOrderV1,
    Event,
    StatusEventV1,
    revert_id,
    utcnow,
)
from dercmd.fleet import Fleet
from dercmd.kafka import Publisher
from dercmd.launcher import free_ports
from dercmd.service import Service
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

FLEET = """
entities:
  ev-1: {kind: EV, vendor: tesla, backend: vendor-cloud}
  pv-1: {kind: PV, vendor: sma, backend: vendor-cloud, assets: [a1, a2]}
  pv-2: {kind: PV, vendor: fronius, backend: vendor-cloud, vendorDeviceId: FRO-2}
  dev-1: {kind: PV, vendor: gridbox, backend: native-window, assets: [inverter-a, inverter-b]}
"""


class RecordingPublisher(Publisher):
    """Publishes for real and keeps what it published, for the test to read."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, source="/dercmd/dispatch-test")
        self.events: list[tuple[str, Event]] = []

    async def publish_all(self, records: Sequence[tuple[topics.Topic, Event, str]]) -> None:
        await super().publish_all(records)
        self.events += [(topic.name, event) for topic, event, _ in records]


@dataclass
class Harness:
    dispatcher: Dispatcher
    publisher: RecordingPublisher
    sim: FastAPI
    http: httpx.AsyncClient  # to the simulator
    redis: aioredis.Redis

    def statuses(self, command_id: str) -> list[StatusEventV1]:
        return [e for t, e in self.publisher.events if isinstance(e, StatusEventV1) and e.command_id == command_id]

    def reports(self, entity_id: str | None = None) -> list[DeviceReportV1]:
        return [e for t, e in self.publisher.events
                if t == topics.REPORTS.name and isinstance(e, DeviceReportV1) and entity_id in (None, e.entity_id)]

    async def deliver(self, *events: DispatchOrderV1 | DeliveryCheckV1) -> None:
        """One consumed batch, handled to its end (as before its offsets are committed)."""
        await asyncio.wait_for(await self.dispatcher.handle([Item(e, None) for e in events]), 20)  # type: ignore[arg-type]

    async def received(self, entity_id: str) -> list[dict[str, Any]]:
        return (await self.http.get(f"/sim/devices/{entity_id}/received")).json()["commands"]

    async def holds(self, entity_id: str) -> dict[str, Any]:
        return (await self.http.get(f"/sim/devices/{entity_id}/state")).json()["measurements"]

    async def state(self, entity_id: str, command_id: str) -> str:
        raw = await self.redis.get(redis_keys.delivery(entity_id, command_id))
        return raw.decode() if raw else ""


async def serve(app: FastAPI, port: int, lifespan: str) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    task = asyncio.ensure_future(server.serve())
    await until(lambda: server.started, what="a server to listen")
    return server, task


@asynccontextmanager
async def harness(tmp_path: Path, kafka_bootstrap: str, redis_url: str, fleet: str = FLEET, **settings: Any) -> AsyncIterator[Harness]:
    """The simulator and dispatch's HTTP side served, dispatch's backends made and subscribed."""
    (tmp_path / "fleet.yaml").write_text(fleet)
    sim_port, dispatch_port = free_ports(2)
    config = Settings(
        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, fleet_file=str(tmp_path / "fleet.yaml"),
        simulator_port=sim_port, dispatch_port=dispatch_port, sim_confirm_delay_ms=5, **settings,
    )
    sim = create_app(config)
    service = Service("dispatch-test", config, port=dispatch_port)
    publisher = service.publisher = RecordingPublisher(config)
    dispatcher = Dispatcher(service, Fleet.load(config.fleet_file))
    add_routes(service.app, dispatcher)
    servers = [await serve(sim, sim_port, "on"), await serve(service.app, dispatch_port, "off")]
    await dispatcher.start()
    client = aioredis.from_url(redis_url)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim_port}", timeout=10) as http:
        try:
            yield Harness(dispatcher, publisher, sim, http, client)
        finally:
            await dispatcher.aclose()
            for server, task in reversed(servers):
                server.should_exit = True
                await asyncio.wait_for(task, 20)
            await publisher.stop()
            await service.redis.aclose()
            await client.aclose()


async def until(probe: Callable[[], Any], deadline_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``probe`` (a function or coroutine function) until it returns something truthy."""
    end = asyncio.get_running_loop().time() + deadline_s
    while True:
        result = probe()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        assert asyncio.get_running_loop().time() < end, f"timed out after {deadline_s:.0f} s waiting for {what}"
        await asyncio.sleep(0.02)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def order(entity_id: str, type: CommandType = CommandType.START_CHARGING, fence: int = 1, command_id: str | None = None,
          **fields: Any) -> DispatchOrderV1:
    now = utcnow()
    return DispatchOrderV1(command_id=command_id or f"c-{uuid.uuid4().hex[:12]}", entity_id=entity_id, type=type, fence=fence,
                           accepted_at=now, ordered_at=now, **fields)


def window(entity_id: str, percentage: int, length_s: float, assets: Sequence[str] | None = None, fence: int = 1) -> DispatchOrderV1:
    start = utcnow()
    return order(entity_id, CommandType.LIMIT_PRODUCTION_POWER, fence, percentage=percentage, start_at=start,
                 end_at=start + timedelta(seconds=length_s), asset_identifiers=tuple(assets) if assets else None)


def revert(of: DispatchOrderV1, fence: int) -> DispatchOrderV1:
    return order(of.entity_id, CommandType.LIMIT_PRODUCTION_POWER, fence, command_id=revert_id(of.command_id),
                 percentage=100, asset_identifiers=of.asset_identifiers, revert_of=of.command_id)


def check(of: DispatchOrderV1 | str, entity_id: str | None = None) -> DeliveryCheckV1:
    command_id, entity = (of, entity_id) if isinstance(of, str) else (of.command_id, of.entity_id)
    return DeliveryCheckV1(command_id=command_id, entity_id=entity, at=utcnow())  # type: ignore[arg-type]


def assets_of(measurements: dict[str, Any]) -> dict[str, int]:
    return {name: a["limitPercentage"] for name, a in measurements["assets"].items()}


# -- native windows --------------------------------------------------------------------------


async def test_a_native_window_reaches_the_device_once_with_its_assets_and_lapses_there_on_its_own(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0, dispatch_report_after_s=0) as h:
        limit = window("dev-1", 30, 1.5, ["inverter-a"])
        await h.deliver(limit)

        # Confirmed by the device's answer: Sent then Succeeded, no callback to wait for.
        assert [e.status for e in h.statuses(limit.command_id)] == [CommandStatus.SENT, CommandStatus.SUCCEEDED]
        [entry] = await h.received("dev-1")
        assert entry["commandId"] == limit.command_id and entry["type"] == "LimitProductionPower"
        assert (entry["percentage"], entry["assets"], entry["value"]) == (30, ["inverter-a"], None)
        assert datetime.fromisoformat(entry["startAt"]) == limit.start_at
        assert datetime.fromisoformat(entry["endAt"]) == limit.end_at
        assert "revertOf" not in entry and entry["backend"] == "native-window"
        assert assets_of(await h.holds("dev-1")) == {"inverter-a": 30, "inverter-b": 100}

        # The extra report after the start, then the one at the window's end, when the device
        # has dropped the limit by itself (nobody sent it anything).
        start = await until(lambda: h.reports("dev-1"), what="the report after the window's start")
        assert start[0].command_id == limit.command_id
        assert assets_of(start[0].measurements) == {"inverter-a": 30, "inverter-b": 100}
        reports = await until(lambda: len(h.reports("dev-1")) >= 2 and h.reports("dev-1"), what="the report at the window's end")
        end = reports[1]
        assert end.command_id == limit.command_id and end.at >= limit.end_at  # type: ignore[operator]
        assert assets_of(end.measurements) == {"inverter-a": 100, "inverter-b": 100}
        assert end.measurements["activePowerW"] == 10_000
        assert len(await h.received("dev-1")) == 1  # no revert was sent


async def test_a_native_window_cancelled_early_is_cleared_by_its_revert_an_entry_of_its_own(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0, dispatch_report_after_s=0) as h:
        limit = window("dev-1", 0, 3600, ["inverter-a", "inverter-b"])
        await h.deliver(limit)
        assert (await h.holds("dev-1"))["activePowerW"] == 0
        await until(lambda: h.reports("dev-1"), what="the report after the start")
        lift = revert(limit, fence=2)
        await h.deliver(lift)

        assert [e.status for e in h.statuses(lift.command_id)] == [CommandStatus.SENT, CommandStatus.SUCCEEDED]
        first, second = await h.received("dev-1")
        assert first["commandId"] == limit.command_id
        assert second["commandId"] == revert_id(limit.command_id) and second["revertOf"] == limit.command_id
        assert (second["percentage"], second["assets"]) == (100, ["inverter-a", "inverter-b"])
        assert "startAt" not in second and "endAt" not in second
        assert assets_of(await h.holds("dev-1")) == {"inverter-a": 100, "inverter-b": 100}
        await until(lambda: any(r.command_id == lift.command_id for r in h.reports("dev-1")), what="the report after the revert")
        [after] = [r for r in h.reports("dev-1") if r.command_id == lift.command_id]
        assert assets_of(after.measurements) == {"inverter-a": 100, "inverter-b": 100}
        # The end of the cleared window will not be reported a second time.
        assert "dev-1" not in h.dispatcher.reports._window_ends


async def test_a_native_device_refuses_an_asset_it_does_not_have(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0) as h:
        wrong = window("dev-1", 50, 60, ["inverter-z"])
        await h.deliver(wrong)
        [failed] = h.statuses(wrong.command_id)
        assert (failed.status, failed.reason) == (CommandStatus.FAILED, "backend_refused")
        assert "inverter-z" in (failed.detail or "")
        assert await h.received("dev-1") == []


# -- vendor cloud: limit now, revert later ---------------------------------------------------


async def test_a_window_on_the_vendor_cloud_is_a_limit_now_and_its_revert_lifts_it(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0, dispatch_report_after_s=0) as h:
        limit = window("pv-1", 40, 3600, ["a1"])
        await h.deliver(limit)
        await until(lambda: len(h.statuses(limit.command_id)) == 2, what="the vendor's result")  # by callback
        assert [e.status for e in h.statuses(limit.command_id)] == [CommandStatus.SENT, CommandStatus.SUCCEEDED]
        [entry] = await h.received("pv-1")
        assert (entry["percentage"], entry["assets"], entry["backend"]) == (40, ["a1"], "vendor-cloud")
        assert "startAt" not in entry and "endAt" not in entry  # this cloud keeps no windows
        assert assets_of(await h.holds("pv-1")) == {"a1": 40, "a2": 100}
        after_start = await until(lambda: [r for r in h.reports("pv-1") if r.command_id == limit.command_id],
                                  what="the report after the start")
        assert assets_of(after_start[0].measurements) == {"a1": 40, "a2": 100}
        assert after_start[0].measurements["activePowerW"] == 7000

        lift = revert(limit, fence=2)
        await h.deliver(lift)
        await until(lambda: len(h.statuses(lift.command_id)) == 2, what="the revert's result")
        assert h.statuses(lift.command_id)[-1].status is CommandStatus.SUCCEEDED
        entries = await h.received("pv-1")
        assert [(e["commandId"], e.get("revertOf"), e["percentage"]) for e in entries] == [
            (limit.command_id, None, 40), (lift.command_id, limit.command_id, 100)
        ]
        assert assets_of(await h.holds("pv-1")) == {"a1": 100, "a2": 100}
        after_end = await until(lambda: [r for r in h.reports("pv-1") if r.command_id == lift.command_id],
                                what="the report after the end")
        assert assets_of(after_end[0].measurements) == {"a1": 100, "a2": 100}


async def test_a_plain_percentage_reaches_a_vendor_device_without_assets(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0) as h:
        limit = order("pv-2", CommandType.LIMIT_PRODUCTION_POWER, percentage=25)
        await h.deliver(limit)
        await until(lambda: len(h.statuses(limit.command_id)) == 2, what="the vendor's result")
        [entry] = await h.received("pv-2")
        assert entry["percentage"] == 25 and "assets" not in entry
        assert (await h.holds("pv-2"))["limitPercentage"] == 25
        assert h.reports() == []  # not a window: no extra report


# -- periodic reports ------------------------------------------------------------------------


async def test_periodic_reports_arrive_in_bulk_spread_over_the_interval_and_are_published(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    many = "\n".join(f"  pv-x{i:03d}: {{kind: PV, vendor: sma, backend: vendor-cloud}}" for i in range(100))
    posts_before = metric("dercmd_simulator_report_posts_total", backend="vendor-cloud")
    async with harness(tmp_path, kafka_bootstrap, redis_url, fleet=FLEET + many, sim_report_interval_s=1.0) as h:
        devices = {f"pv-x{i:03d}" for i in range(100)} | {"pv-1", "pv-2", "dev-1"}
        first = await until(lambda: {r.entity_id for r in h.reports()} >= devices and h.reports(), what="a report of every device")
        posts = metric("dercmd_simulator_report_posts_total", backend="vendor-cloud") - posts_before
        vendor_reports = [r for r in first if r.entity_id != "dev-1"]
        assert posts * 3 < len(vendor_reports)  # in bulk, not a POST per device
        cycle = sorted(r.at for r in vendor_reports[:102])
        assert (cycle[-1] - cycle[0]).total_seconds() > 0.3  # spread over the interval, not all at once

        report = next(r for r in first if r.entity_id == "pv-2")  # known to its vendor as FRO-2
        assert report.command_id is None
        assert report.measurements == {"activePowerW": 5000, "limitPercentage": 100, "connected": True}
        assert set(h.dispatcher.reports._next_report) >= devices  # each says when it reports next


async def test_no_extra_report_when_a_periodic_one_is_due_within_3_s(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=2.0, dispatch_report_after_s=0) as h:
        await until(lambda: h.reports("pv-1"), what="a periodic report of pv-1")
        skipped = metric("dercmd_dispatch_report_requests_total", result="skipped")
        limit = window("pv-1", 10, 3600, ["a2"])
        await h.deliver(limit)
        await until(lambda: metric("dercmd_dispatch_report_requests_total", result="skipped") > skipped, what="the skip")
        assert all(r.command_id is None for r in h.reports("pv-1"))
        # The periodic report that was due shows the limit.
        await until(lambda: any(assets_of(r.measurements)["a2"] == 10 for r in h.reports("pv-1")), what="the limit reported")


# -- delivery checks -------------------------------------------------------------------------


async def test_a_check_takes_the_outcome_the_backend_knows_when_its_callback_was_lost(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0) as h:
        h.sim.state.vendor_cloud.results.lose_results = True
        lost = order("ev-1")
        await h.deliver(lost)
        assert await h.state("ev-1", lost.command_id) == "sent"
        succeeded = metric("dercmd_dispatch_delivery_checks_total", result="succeeded")

        await h.deliver(check(lost))

        assert [e.status for e in h.statuses(lost.command_id)] == [CommandStatus.SENT, CommandStatus.SUCCEEDED]
        assert (await h.state("ev-1", lost.command_id)).startswith("done:Succeeded")
        assert metric("dercmd_dispatch_delivery_checks_total", result="succeeded") == succeeded + 1


async def test_a_check_without_an_answer_fails_the_command_and_a_late_callback_adds_no_second_terminal(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0) as h:
        vendor = h.sim.state.vendor_cloud
        vendor.results.hold_results = True
        late = order("ev-1")
        await h.deliver(late)
        assert await h.state("ev-1", late.command_id) == "sent"

        await h.deliver(check(late))  # the vendor says PENDING

        sent, failed = h.statuses(late.command_id)
        assert (sent.status, failed.status, failed.reason) == (CommandStatus.SENT, CommandStatus.FAILED, "no_confirmation")
        assert "PENDING" in (failed.detail or "")
        callbacks = metric("dercmd_dispatch_callbacks_total", result="Succeeded")
        vendor.release_results()  # the genuine result comes after all
        await until(lambda: metric("dercmd_dispatch_callbacks_total", result="Succeeded") > callbacks, what="the late callback")

        terminal = [e for e in h.statuses(late.command_id) if e.status.terminal]
        assert {(e.event_id, e.status, e.reason) for e in terminal} == {(failed.event_id, CommandStatus.FAILED, "no_confirmation")}
        assert (await h.state("ev-1", late.command_id)).startswith("done:Failed|no_confirmation")


async def test_checks_are_split_from_orders_and_only_open_commands_are_decided(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0) as h:
        done = order("ev-1")
        await h.deliver(done)
        await until(lambda: len(h.statuses(done.command_id)) == 2, what="the first command's result")
        # A native-window command left "sent" (as if dispatch stopped after publishing Sent):
        # the backend is asked, and the device never stored it.
        native = "n-1"
        deliveries = Deliveries(h.redis)
        await deliveries.claim("dev-1", native, 0)
        await deliveries.accepted("dev-1", native)
        await deliveries.sent("dev-1", native)
        not_open = metric("dercmd_dispatch_delivery_checks_total", result="not_open")
        republished = metric("dercmd_dispatch_delivery_checks_total", result="republished")
        fresh = order("ev-1", fence=2)

        await h.deliver(check("never-claimed", "ev-1"), fresh, check(done), check(native, "dev-1"))

        assert h.statuses("never-claimed") == []
        assert metric("dercmd_dispatch_delivery_checks_total", result="not_open") == not_open + 1
        # Already ended: its recorded outcome again (same event id), nothing new.
        assert [(e.status, e.event_id) for e in h.statuses(done.command_id)][-1] == (
            CommandStatus.SUCCEEDED, f"{done.command_id}/Succeeded")
        assert metric("dercmd_dispatch_delivery_checks_total", result="republished") == republished + 1
        [failed] = h.statuses(native)
        assert (failed.status, failed.reason) == (CommandStatus.FAILED, "no_confirmation")
        assert "native-window says UNKNOWN" in (failed.detail or "")  # it never stored it: asked, not assumed
        await until(lambda: len(h.statuses(fresh.command_id)) == 2, what="the order beside the checks")  # delivered as usual
        assert [c["commandId"] for c in await h.received("ev-1")] == [done.command_id, fresh.command_id]



# -- orders held until their time ------------------------------------------------------------


async def test_held_orders_reach_their_devices_at_their_time_not_before_and_all_before_any_records(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    async with harness(tmp_path, kafka_bootstrap, redis_url, sim_report_interval_s=0, dispatch_report_after_s=0,
                       dispatch_backend_batch=1) as h:
        at = utcnow() + timedelta(seconds=1)
        held = [order(e, CommandType.LIMIT_FEED_IN, value=1000, not_before=at) for e in ("pv-1", "pv-2")]
        now_order = order("ev-1")
        done = await h.dispatcher.handle([Item(o, None) for o in [*held, now_order]])  # type: ignore[arg-type]
        # The order without a time goes at once; the held ones wait, unclaimed.
        await until(lambda: h.received("ev-1"), what="the order without a time")
        assert await h.state("pv-1", held[0].command_id) == ""
        await asyncio.wait_for(done, 20)
        received = []
        for o in held:
            [entry] = await h.received(o.entity_id)
            assert entry["commandId"] == o.command_id and datetime.fromisoformat(entry["receivedAt"]) >= at
            received.append(datetime.fromisoformat(entry["receivedAt"]))
        # Two calls (a batch of 1 each): both devices had theirs before either call said Sent.
        sent = [e.at for o in held for e in h.statuses(o.command_id) if e.status is CommandStatus.SENT]
        assert len(sent) == 2 and max(received) <= min(sent)
