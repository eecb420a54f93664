"""The simulator's ``/sim/receipts``: every device's receipts in receive order, paged by seq."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from dercmd.settings import Settings
from dercmd.simulator.app import create_app

FLEET = Path(__file__).parents[2] / "deploy" / "fleet.example.yaml"
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


async def test_receipts_are_paged_in_receive_order_and_per_entity_reads_still_work() -> None:
    app = create_app(Settings(fleet_file=str(FLEET)))
    recorder = app.state.recorder
    for i, entity in enumerate(["ev-1", "pv-1", "ev-1", "cp-2", "ev-1"]):
        value = 3000 if entity == "pv-1" else None
        kind = "LimitFeedIn" if entity == "pv-1" else "StartCharging"
        recorder.record(entity, "vendor-cloud", f"c{i}", kind, value, T0 + timedelta(milliseconds=i))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        first = (await client.get("/sim/receipts", params={"limit": 2})).json()
        assert [r["commandId"] for r in first["receipts"]] == ["c0", "c1"]
        assert first["receipts"][1] == {
            "seq": 2, "entityId": "pv-1", "backend": "vendor-cloud", "commandId": "c1",
            "type": "LimitFeedIn", "value": 3000, "receivedAt": (T0 + timedelta(milliseconds=1)).isoformat(),
        }
        rest = (await client.get("/sim/receipts", params={"after": first["next"], "limit": 10})).json()
        assert [r["seq"] for r in rest["receipts"]] == [3, 4, 5]
        assert rest["next"] == 5

        empty = (await client.get("/sim/receipts", params={"after": 5})).json()
        assert empty == {"receipts": [], "next": 5}

        recorder.record("pv-1", "vendor-cloud", "c5", "StopFeedIn", None, T0)
        later = (await client.get("/sim/receipts", params={"after": 5})).json()
        assert [(r["seq"], r["commandId"]) for r in later["receipts"]] == [(6, "c5")]

        ev1 = (await client.get("/sim/devices/ev-1/received")).json()
        assert [c["commandId"] for c in ev1["commands"]] == ["c0", "c2", "c4"]
        assert (await client.get("/sim/received")).json() == {"total": 6}

        assert (await client.get("/sim/receipts", params={"limit": 0})).json()["key"] == "validation_error"
