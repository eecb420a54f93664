"""The caller's deadline (``expiresAt``) end to end: no delivery after it, and the command ends
``Failed: expired`` within a second of it, whether dispatch was retrying it or it was still
waiting for its start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import Api, Kafka, inverters_stack

pytestmark = pytest.mark.e2e

PV = ["pv-d0", "pv-d1"]


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The sweeper's round stays at its default (5 s): a deadline is kept to the moment anyway.
    yield from inverters_stack(request, tmp_path_factory, PV, sweep_interval_s="5")


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _ended_at(command: dict) -> datetime:
    return datetime.fromisoformat(command["confirmedAt"].replace("Z", "+00:00"))


def test_a_deadline_passing_during_retries_ends_the_command_then_and_it_is_never_delivered(api: Api) -> None:
    # Every call for pv-d0 is refused before the device acts (503): dispatch retries it.
    api.sim.put("/sim/faults", json={"devices": ["pv-d0"], "probability": 1, "kinds": ["5xx"]}).raise_for_status()
    try:
        expires = datetime.now(UTC) + timedelta(seconds=3)
        sent = api.post("pv-d0", {"type": "LimitFeedIn", "value": 1000, "expiresAt": _iso(expires)})
        assert sent.status_code == 201, sent.text
        ended = api.wait_terminal(sent.json()["id"], deadline_s=15)
    finally:
        api.sim.delete("/sim/faults").raise_for_status()
    assert (ended["status"], ended["reason"]) == ("Failed", "expired"), ended
    late = (_ended_at(ended) - expires).total_seconds()
    assert -0.05 <= late < 1.0, f"ended {late:.3f} s after its expiresAt"
    # The device works again: a newer command reaches it, the expired one never does.
    after = api.post("pv-d0", {"type": "LimitFeedIn", "value": 2000})
    assert api.wait_terminal(after.json()["id"])["status"] == "Succeeded"
    assert [c["commandId"] for c in api.received("pv-d0")] == [after.json()["id"]]


def test_a_command_still_waiting_for_its_start_ends_at_its_deadline(api: Api, kafka: Kafka) -> None:
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=3)
    request = {"id": "deadline-before-start", "entityId": "pv-d1", "type": "LimitProductionPower", "percentage": 30,
               "startAt": _iso(now + timedelta(seconds=20)), "endAt": _iso(now + timedelta(seconds=60)),
               "expiresAt": _iso(expires)}
    kafka.produce("dercmd.commands.requests", [(b"pv-d1", json.dumps(request).encode(), [])])
    ended = wait_for(lambda: (r := api.get("deadline-before-start")).status_code == 200 and r.json()["status"] in ("Failed", "Canceled")
                     and r.json(), deadline_s=15, what="the scheduled command to end")
    assert (ended["status"], ended["reason"]) == ("Failed", "expired"), ended
    late = (_ended_at(ended) - expires).total_seconds()
    assert -0.05 <= late < 1.0, f"ended {late:.3f} s after its expiresAt"
    assert api.received("pv-d1") == []
