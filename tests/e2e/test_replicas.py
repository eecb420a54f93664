"""Two arbitration replicas share the due-index: every window starts and ends exactly once,
also when one replica is killed (-9) while windows come due."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from dercmd.events import revert_id
from dercmd.launcher import Stack, free_port

from ..conftest import wait_for
from .conftest import Api, inverters_stack

pytestmark = pytest.mark.e2e

PV = [f"pv-r{i:03d}" for i in range(200)]


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from inverters_stack(request, tmp_path_factory, PV)


def test_two_replicas_start_and_end_every_window_once_even_when_one_is_killed(api: Api, stack: Stack) -> None:
    second = stack.add_replica("arbitration", free_port())
    start = datetime.now(UTC) + timedelta(seconds=3)
    ids: dict[str, str] = {}
    for group in (PV[:100], PV[100:]):
        body = {"command": {"type": "limitProductionPower", "percentage": 25, "startAt": start.isoformat(),
                            "endAt": (start + timedelta(seconds=3)).isoformat()}, "deviceHashIds": group}
        answer = api.batch(body)
        assert answer.status_code == 201, answer.text
        ids |= {c["deviceHashId"]: c["id"] for c in answer.json()["commands"]}
    # Kill the first replica while the starts come due: the other one goes on alone, and
    # takes over its partitions and whatever due entries it had leased.
    wait_for(lambda: datetime.now(UTC) >= start, deadline_s=10, what="the start")
    stack.kill("arbitration")

    def all_done() -> bool:
        got = {c["commandId"] for c in api.sim.get("/sim/receipts", params={"limit": 10_000}).json()["receipts"]}
        return all(c in got and revert_id(c) in got for c in ids.values())

    wait_for(all_done, deadline_s=60, what="every window to start and end")
    for device, command_id in ids.items():
        assert [c["commandId"] for c in api.received(device)] == [command_id, revert_id(command_id)], device
    assert stack.procs[second].poll() is None
