"""A BMW onboarded through the EV aggregator (``ev-3`` of the example fleet) steered end to end:
REST -> intake -> arbitration -> dispatch -> the simulated aggregator, the result back by
webhook, or by dispatch polling the action when the webhook is lost. The aggregator's access
tokens live 2 s, so dispatch renews its token while the tests run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dercmd.launcher import Stack

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
