"""The whole stack while the simulated vendor cloud fails a third of its calls in every way it
can (late, 5xx, 429, hanging or dropping after the devices acted, results lost): every command
still ends, each device got its command once, and each status says what the device got."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import TERMINAL, Api, inverters_stack

pytestmark = pytest.mark.e2e

PV = [f"pv-i{i:03d}" for i in range(300)]


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from inverters_stack(request, tmp_path_factory, PV, vendor_cloud_timeout_s="1", deadline_sent_s="4",
                               sweep_interval_s="0.5", dispatch_backend_batch="10")


def test_under_faults_on_a_third_of_calls_every_command_ends_once_and_truthfully(api: Api, stack: Stack) -> None:
    api.sim.put("/sim/faults", json={"probability": 0.33, "latencyMs": 300, "retryAfterS": 0.5, "hangS": 3}).raise_for_status()
    ids = {api.post(e, {"type": "LimitFeedIn", "value": 1000}).json()["id"]: e for e in PV}

    def ended() -> dict[str, dict]:
        states = {c: api.get(c).json() for c in ids}
        return states if all(s["status"] in TERMINAL for s in states.values()) else {}

    states = wait_for(ended, deadline_s=120, what="every command to end")
    api.sim.delete("/sim/faults").raise_for_status()
    received: dict[str, int] = {}
    for receipt in api.sim.get("/sim/receipts", params={"limit": 10_000}).json()["receipts"]:
        received[receipt["commandId"]] = received.get(receipt["commandId"], 0) + 1
    assert [c for c, n in received.items() if n > 1] == []  # never delivered twice
    assert {s["status"] for s in states.values()} == {"Succeeded"}, {s["status"]: s.get("reason") for s in states.values()}
    assert set(received) == set(ids)  # and every Succeeded was received
    metrics = httpx.get(f"{stack.url('dispatch')}/metrics").text
    for family in ("dercmd_dispatch_retries_total{", "dercmd_dispatch_unknown_deliveries_total{"):
        assert sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(family)) > 0, family
