"""The example fleet's SunSpec inverter (pv-2, backend sunspec-modbus) end to end: every PV type
over REST reaches the simulator's Modbus server once, ends Succeeded, and shows in the device's
state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dercmd.launcher import Stack

from .conftest import Api, running_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(request, tmp_path_factory, cooldown_s="0")


def test_every_pv_type_reaches_pv_2_over_modbus_and_succeeds(stack: Stack) -> None:
    api = Api(stack)
    bodies = [{"type": "LimitFeedIn", "value": 2500}, {"type": "StopFeedIn"}, {"type": "Disconnect"},
              {"type": "LimitProductionPower", "percentage": 40}, {"type": "Reset"}]
    expected = [{"activePowerW": 2500, "limitPercentage": 50, "connected": True},
                {"activePowerW": 0, "limitPercentage": 0, "connected": True},
                {"activePowerW": 0, "limitPercentage": 0, "connected": False},
                {"activePowerW": 0, "limitPercentage": 40, "connected": False},
                {"activePowerW": 5000, "limitPercentage": 100, "connected": True}]
    ids = []
    for body, state in zip(bodies, expected, strict=True):
        created = api.post("pv-2", body)
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
        done = api.wait_terminal(ids[-1])
        assert done["status"] == "Succeeded", done
        assert api.sim.get("/sim/devices/pv-2/state").json()["measurements"] == state
    assert [(c["commandId"], c["type"]) for c in api.received("pv-2")] == list(zip(ids, [b["type"] for b in bodies], strict=True))
