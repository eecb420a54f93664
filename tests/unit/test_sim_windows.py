"""The simulator's native-window devices, the limits simulated devices hold, the vendor cloud's
``commands:status``, and on-demand reports, through the simulator's app in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from dercmd.events import utcnow
from dercmd.protocols.common import DeviceReports
from dercmd.protocols.native_window import NativeBatchAnswer
from dercmd.protocols.common import StatusAnswer
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

NATIVE, VENDOR = "native-token", "vendor-token"
FLEET = """
entities:
  dev-1: {kind: PV, vendor: gridbox, backend: native-window, assets: [inverter-a, inverter-b]}
  pv-1: {kind: PV, vendor: sma, backend: vendor-cloud, assets: [a1, a2]}
  ev-1: {kind: EV, vendor: tesla, backend: vendor-cloud}
"""


@pytest.fixture
async def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    monkeypatch.setenv("DERCMD_NATIVE_WINDOW_TOKEN", NATIVE)
    monkeypatch.setenv("DERCMD_VENDOR_CLOUD_TOKEN", VENDOR)
    settings = Settings(fleet_file=str(tmp_path / "fleet.yaml"), sim_confirm_delay_ms=5, sim_report_interval_s=0)
    app = create_app(settings, callback_transport=httpx.MockTransport(lambda request: httpx.Response(200, json={})))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def native(client: httpx.AsyncClient, *commands: dict[str, Any], token: str = NATIVE) -> Any:
    return client.post("/native-window/v1/commands:batch", json={"commands": list(commands)},
                       headers={"Authorization": f"Bearer {token}"})


def limit(command_id: str, percentage: int, device: str = "dev-1", **extra: Any) -> dict[str, Any]:
    return {"deviceId": device, "commandId": command_id, "type": "LimitProductionPower", "percentage": percentage, **extra}


async def holds(client: httpx.AsyncClient, entity_id: str) -> dict[str, int]:
    measurements = (await client.get(f"/sim/devices/{entity_id}/state")).json()["measurements"]
    return {name: a["limitPercentage"] for name, a in measurements["assets"].items()}


async def test_a_native_device_stores_windows_per_asset_and_refuses_what_it_cannot_do(sim: httpx.AsyncClient) -> None:
    now = utcnow()
    end = now + timedelta(hours=1)
    answer = await native(
        sim,
        limit("w1", 30, startAt=now.isoformat(), endAt=end.isoformat(), assetIdentifiers=["inverter-a"]),
        limit("w2", 30, assetIdentifiers=["inverter-z"]),
        limit("w3", 30, startAt=(now - timedelta(hours=2)).isoformat(), endAt=(now - timedelta(hours=1)).isoformat()),
        limit("w4", 30, device="ghost"),
        {"deviceId": "dev-1", "commandId": "w5", "type": "LimitProductionPower", "percentage": 100,
         "assetIdentifiers": ["inverter-b"], "revertOf": "w0"},
    )
    assert answer.status_code == 200, answer.text
    results = NativeBatchAnswer.model_validate_json(answer.content).results
    assert [(r.command_id, r.status) for r in results] == [("w1", 201), ("w2", 409), ("w3", 409), ("w4", 404), ("w5", 201)]
    assert "inverter-z" in (results[1].message or "") and results[2].message == "end_at_in_the_past"

    entries = (await sim.get("/sim/devices/dev-1/received")).json()["commands"]
    assert [e["commandId"] for e in entries] == ["w1", "w5"]  # what was refused never reached the device
    assert entries[0]["startAt"] == now.isoformat() and entries[0]["endAt"] == end.isoformat()
    assert entries[0]["assets"] == ["inverter-a"] and entries[0]["percentage"] == 30
    assert entries[1]["revertOf"] == "w0" and "startAt" not in entries[1]
    assert await holds(sim, "dev-1") == {"inverter-a": 30, "inverter-b": 100}


async def test_a_native_window_lapses_on_the_device_at_its_end(sim: httpx.AsyncClient) -> None:
    now = utcnow()
    end = now + timedelta(milliseconds=300)
    assert (await native(sim, limit("w1", 0, startAt=now.isoformat(), endAt=end.isoformat()))).status_code == 200
    assert await holds(sim, "dev-1") == {"inverter-a": 0, "inverter-b": 0}
    async with asyncio.timeout(10):
        while utcnow() < end:
            await asyncio.sleep(0.05)
    assert await holds(sim, "dev-1") == {"inverter-a": 100, "inverter-b": 100}


async def test_a_wrong_token_or_a_malformed_batch_is_refused(sim: httpx.AsyncClient) -> None:
    assert (await native(sim, limit("w1", 10), token=VENDOR)).status_code == 401
    malformed = await sim.post("/native-window/v1/commands:batch", content=b'{"commands": []}',
                               headers={"Authorization": f"Bearer {NATIVE}"})
    assert malformed.status_code == 400 and "malformed" in malformed.json()["message"]
    assert (await sim.get("/sim/devices/dev-1/received")).json()["commands"] == []


async def test_the_vendor_cloud_says_what_became_of_each_command(sim: httpx.AsyncClient) -> None:
    vendor = sim.app.state.vendor_cloud  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {VENDOR}"}

    async def batch(command_id: str) -> None:
        body = {"responseUrl": "http://dispatch.test/cb", "commands": [
            {"deviceId": "ev-1", "commandId": command_id, "type": "StartCharging", "responseToken": "t"}]}
        assert (await sim.post("/vendor-cloud/v1/commands:batch", json=body, headers=headers)).status_code == 200

    async def status(*ids: str) -> list[tuple[str, str]]:
        answer = await sim.post("/vendor-cloud/v1/commands:status", json={"commandIds": list(ids)}, headers=headers)
        return [(r.command_id, r.status) for r in StatusAnswer.model_validate_json(answer.content).results]

    await batch("done")
    vendor.results.hold_results = True
    await batch("held")
    async with asyncio.timeout(10):
        while (await status("done"))[0][1] != "SUCCEEDED":  # decided after the confirm delay
            await asyncio.sleep(0.01)
    assert await status("held", "done", "never") == [("held", "PENDING"), ("done", "SUCCEEDED"), ("never", "UNKNOWN")]
    vendor.release_results()
    async with asyncio.timeout(10):
        while (await status("held"))[0][1] != "SUCCEEDED":
            await asyncio.sleep(0.01)
    assert (await sim.post("/vendor-cloud/v1/commands:status", json={"commandIds": ["x"]})).status_code == 401


async def test_a_vendor_device_holds_the_limit_per_asset_and_refuses_unknown_assets(sim: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {VENDOR}"}
    body = {"responseUrl": "http://dispatch.test/cb", "commands": [
        {"deviceId": "pv-1", "commandId": "l1", "type": "LimitProductionPower", "percentage": 20, "assets": ["a2"], "responseToken": "t"},
        {"deviceId": "pv-1", "commandId": "l2", "type": "LimitProductionPower", "percentage": 20, "assets": ["zz"], "responseToken": "t"},
    ]}
    answer = (await sim.post("/vendor-cloud/v1/commands:batch", json=body, headers=headers)).json()
    assert [r["status"] for r in answer["results"]] == [202, 409]
    assert await holds(sim, "pv-1") == {"a1": 100, "a2": 20}
    [entry] = (await sim.get("/sim/devices/pv-1/received")).json()["commands"]
    assert (entry["commandId"], entry["percentage"], entry["assets"]) == ("l1", 20, ["a2"])
    assert (await sim.get("/sim/devices/ev-1/state")).status_code == 404  # an EV measures nothing here


async def test_reports_on_request_come_from_measuring_devices_only(sim: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {VENDOR}"}
    answer = await sim.post("/vendor-cloud/v1/reports:request", json={"deviceIds": ["pv-1", "ev-1", "ghost"]}, headers=headers)
    [report] = DeviceReports.model_validate_json(answer.content).reports
    assert report.device_id == "pv-1" and report.next_report_at is None  # no periodic reports (interval 0)
    assert report.measurements["activePowerW"] == 10_000
    subscription = {"url": "http://dispatch.test/callbacks/vendor-cloud/reports", "token": "secret"}
    assert (await sim.put("/vendor-cloud/v1/reports:subscription", json=subscription, headers=headers)).status_code == 204
    assert (await sim.put("/native-window/v1/reports:subscription", json=subscription, headers=headers)).status_code == 401
