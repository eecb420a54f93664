"""The native-window client, the vendor cloud's status query, and the report calls every bulk
REST client shares, against scripted backends (httpx.MockTransport): what goes on the wire."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from dercmd.protocols.native_window import NativeCommand, NativeWindowClient, NativeWindowError
from dercmd.protocols.vendor_cloud import VendorCloudClient, VendorCloudError

START, END = datetime(2026, 6, 1, 14, 0, tzinfo=UTC), datetime(2026, 6, 1, 15, 0, tzinfo=UTC)


def recorder(answer: dict | None, seen: list[httpx.Request], status: int = 200):  # type: ignore[no-untyped-def]
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=answer) if answer is not None else httpx.Response(status)

    return httpx.MockTransport(handle)


async def test_a_window_goes_with_its_start_end_and_assets_and_201_means_stored() -> None:
    seen: list[httpx.Request] = []
    client = NativeWindowClient("http://box.test/native-window", "secret", transport=recorder(
        {"results": [{"commandId": "w1", "status": 201}, {"commandId": "w2", "status": 409, "message": "end_at_in_the_past"}]}, seen))
    results = await client.send_commands([
        NativeCommand(device_id="dev-1", command_id="w1", type="LimitProductionPower", percentage=30, start_at=START, end_at=END,
                      asset_identifiers=["inverter-a"]),
        NativeCommand(device_id="dev-1", command_id="w2", type="LimitProductionPower", percentage=100, revert_of="w0"),
    ])
    await client.aclose()
    [request] = seen
    assert str(request.url) == "http://box.test/native-window/v1/commands:batch"
    assert request.headers["Authorization"] == "Bearer secret"
    assert json.loads(request.content) == {"commands": [
        {"deviceId": "dev-1", "commandId": "w1", "type": "LimitProductionPower", "percentage": 30,
         "startAt": "2026-06-01T14:00:00Z", "endAt": "2026-06-01T15:00:00Z", "assetIdentifiers": ["inverter-a"]},
        {"deviceId": "dev-1", "commandId": "w2", "type": "LimitProductionPower", "percentage": 100, "revertOf": "w0"},
    ]}
    assert [(r.stored, r.retriable) for r in results] == [(True, False), (False, False)]


async def test_a_native_answer_that_does_not_match_the_batch_is_an_error() -> None:
    client = NativeWindowClient("http://box.test", "s", transport=recorder({"results": []}, []))
    with pytest.raises(NativeWindowError) as caught:
        await client.send_commands([NativeCommand(device_id="d", command_id="w1", type="Reset")])
    assert not caught.value.retriable


async def test_the_vendor_is_asked_about_commands_in_bulk_and_answers_in_order() -> None:
    seen: list[httpx.Request] = []
    answer = {"results": [{"commandId": "c1", "status": "SUCCEEDED"}, {"commandId": "c2", "status": "UNKNOWN"}]}
    client = VendorCloudClient("http://vendor.test/vendor-cloud", "secret", transport=recorder(answer, seen))
    statuses = await client.command_status(["c1", "c2"])
    assert [(s.command_id, s.status) for s in statuses] == [("c1", "SUCCEEDED"), ("c2", "UNKNOWN")]
    assert str(seen[0].url) == "http://vendor.test/vendor-cloud/v1/commands:status"
    assert json.loads(seen[0].content) == {"commandIds": ["c1", "c2"]}
    with pytest.raises(VendorCloudError):
        await client.command_status(["c2", "c1"])  # answered out of order


async def test_reports_are_subscribed_with_a_put_and_requested_in_bulk() -> None:
    seen: list[httpx.Request] = []
    client = VendorCloudClient("http://vendor.test/vendor-cloud", "secret", transport=recorder(None, seen, status=204))
    await client.subscribe_reports("http://dispatch.test/callbacks/vendor-cloud/reports", "tok")
    assert (seen[0].method, str(seen[0].url)) == ("PUT", "http://vendor.test/vendor-cloud/v1/reports:subscription")
    assert json.loads(seen[0].content) == {"url": "http://dispatch.test/callbacks/vendor-cloud/reports", "token": "tok"}

    report = {"deviceId": "pv-1", "at": "2026-06-01T14:00:01Z", "nextReportAt": "2026-06-01T14:01:00Z",
              "measurements": {"activePowerW": 3000, "limitPercentage": 30}}
    client = VendorCloudClient("http://vendor.test/vendor-cloud", "secret", transport=recorder({"reports": [report]}, seen))
    [got] = await client.request_reports(["pv-1", "ev-1"])
    assert json.loads(seen[1].content) == {"deviceIds": ["pv-1", "ev-1"]}
    assert (got.device_id, got.next_report_at, got.measurements["limitPercentage"]) == (
        "pv-1", datetime(2026, 6, 1, 14, 1, tzinfo=UTC), 30)
