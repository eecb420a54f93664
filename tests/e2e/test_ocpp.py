"""OCPP 1.6J through the whole stack: REST -> intake -> arbitration -> dispatch's ocpp backend ->
the OCPP gateway -> a simulated charge point over its WebSocket, and back by its transaction
messages (SQLite ledger)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from dercmd.protocols.ocpp import OcppSettings
from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import Api, running_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite"])
def ocpp_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(request, tmp_path_factory, cooldown_s="0")


@pytest.fixture(scope="module")
def api(ocpp_stack: Stack) -> Api:
    return Api(ocpp_stack)


def declared(stack: Stack) -> dict[str, list[str]]:
    """The charge points connected to the gateway, once each declared its profiles."""
    answer = httpx.get(f"{stack.url('ocpp_gateway')}/internal/v1/charge-points",
                       headers={"authorization": f"Bearer {OcppSettings().gateway_token}"}, timeout=5)
    answer.raise_for_status()
    return {c["entityId"]: c["profiles"] for c in answer.json()["chargePoints"] if c["profiles"] is not None}


def test_start_then_stop_charging_a_charge_point_over_ocpp(ocpp_stack: Stack, api: Api) -> None:
    # The simulator started before the gateway: its charge points keep trying until they are in.
    profiles = wait_for(lambda: (d := declared(ocpp_stack)) and {"cp-1", "cp-3"} <= d.keys() and d, what="charge points to boot")
    assert profiles["cp-1"] == ["Core", "RemoteTrigger"] and profiles["cp-3"] == []

    start = api.post("cp-1", {"type": "StartCharging"})
    assert start.status_code == 201, start.text
    assert api.wait_terminal(start.json()["id"])["status"] == "Succeeded"
    stop = api.post("cp-1", {"type": "StopCharging"})
    assert stop.status_code == 201, stop.text
    assert api.wait_terminal(stop.json()["id"])["status"] == "Succeeded"
    assert [(c["commandId"], c["type"]) for c in api.received("cp-1")] == [
        (start.json()["id"], "StartCharging"), (stop.json()["id"], "StopCharging")]


def test_a_charge_point_that_declared_nothing_is_refused_at_intake(api: Api) -> None:
    refused = api.post("cp-3", {"type": "StartCharging"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["key"] == "command_not_supported"
    assert api.received("cp-3") == []
