"""What a crash leaves open is closed: dispatch killed (-9) while devices are still to confirm
comes back, the results it missed are asked of the backend, and every command ends once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import TERMINAL, Api, inverters_stack

pytestmark = pytest.mark.e2e

PV = [f"pv-f{i:03d}" for i in range(100)]


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from inverters_stack(request, tmp_path_factory, PV, sim_confirm_delay_ms="2000", deadline_sent_s="4",
                               sweep_interval_s="0.5")


def test_results_missed_while_dispatch_was_down_are_asked_for_and_every_command_ends_once(api: Api, stack: Stack) -> None:
    ids = {e: api.post(e, {"type": "StopFeedIn"}).json()["id"] for e in PV}
    # Every device has its command and is taking 2 s to confirm: kill dispatch now, so the
    # devices' results find nobody to take them.
    wait_for(lambda: len(api.sim.get("/sim/receipts", params={"limit": 10_000}).json()["receipts"]) == len(PV),
             deadline_s=30, what="every device to receive its command")
    stack.kill("dispatch")
    down_until = time.monotonic() + 4  # an outage longer than the devices' 2 s and the simulator's one retry
    wait_for(lambda: time.monotonic() > down_until, deadline_s=10, what="the outage to last")
    stack.restart("dispatch")

    def ended() -> dict[str, dict]:
        states = {e: api.get(c).json() for e, c in ids.items()}
        return states if all(s["status"] in TERMINAL for s in states.values()) else {}

    states = wait_for(ended, deadline_s=60, what="every command to end")
    assert {s["status"] for s in states.values()} == {"Succeeded"}, {s["status"]: s.get("reason") for s in states.values()}
    for entity_id, command_id in ids.items():
        assert [c["commandId"] for c in api.received(entity_id)] == [command_id]  # delivered once, never again
    checks = httpx.get(f"{stack.url('dispatch')}/metrics").text
    asked = sum(float(line.split()[-1]) for line in checks.splitlines() if line.startswith("dercmd_dispatch_delivery_checks_total{"))
    assert asked > 0  # the results came from asking the backend: the devices' own posts found nobody
