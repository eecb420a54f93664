"""A BMW onboarded through the EV aggregator (``ev-3`` of the example fleet) steered end to end:
REST -> intake -> arbitration -> dispatch -> the simulated aggregator, the result back by
webhook, or by dispatch polling the action when the webhook is lost. The aggregator's access
tokens live 2 s, so dispatch renews its token while the tests run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import Api, running_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(request, tmp_path_factory, cooldown_s="0", sim_token_ttl_s="2", sim_confirm_delay_ms="200",
                             ev_aggregator_poll_interval_s="0.5")


def test_start_then_stop_charging_each_succeed_and_reach_the_vehicle_once(api: Api) -> None:
    ids = []
    for type in ("StartCharging", "StopCharging"):
        created = api.post("ev-3", {"type": type})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
        final = api.wait_terminal(ids[-1])
        assert final["status"] == "Succeeded", final
    received = [(c["commandId"], c["type"]) for c in api.received("ev-3")]
    assert received == [(ids[0], "StartCharging"), (ids[1], "StopCharging")]


def test_a_lost_webhook_is_made_up_by_polling_the_action(api: Api) -> None:
    before = len(api.received("ev-3"))
    plan = api.sim.put("/sim/faults", json={"devices": ["ev-3"], "probability": 1, "kinds": ["lose_callback"]})
    assert plan.status_code == 200, plan.text
    try:
        command_id = api.post("ev-3", {"type": "StartCharging"}).json()["id"]
        final = api.wait_terminal(command_id)
    finally:
        api.sim.delete("/sim/faults")
    assert final["status"] == "Succeeded", final
    assert [c["commandId"] for c in api.received("ev-3")[before:]] == [command_id]


@pytest.mark.parametrize("kind", ["drop_connection", "5xx"])
def test_a_call_the_aggregator_fails_ends_succeeded_once(api: Api, kind: str) -> None:
    """drop_connection: the action was made and the answer lost, so dispatch asks by the
    command id and finds it; 5xx: nothing was made, so dispatch sends it again once the
    aggregator answers (the same idempotency key either way)."""
    before = len(api.received("ev-3"))
    plan = api.sim.put("/sim/faults", json={"devices": ["ev-3"], "probability": 1, "kinds": [kind]})
    assert plan.status_code == 200, plan.text
    try:
        command_id = api.post("ev-3", {"type": "StopCharging"}).json()["id"]
        if kind == "5xx":
            wait_for(lambda: _faults(api, "5xx") >= 2, deadline_s=10, what="dispatch to try again")
    finally:
        api.sim.delete("/sim/faults")
    final = api.wait_terminal(command_id)
    assert final["status"] == "Succeeded", final
    assert [c["commandId"] for c in api.received("ev-3")[before:]] == [command_id]


def _faults(api: Api, kind: str) -> float:
    for line in api.sim.get("/metrics").text.splitlines():
        if line.startswith(f'dercmd_simulator_faults_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0
