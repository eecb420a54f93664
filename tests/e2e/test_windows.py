"""Time-windowed commands end to end (BRIEF 2.2 and 3): the batch API and its refusals,
scheduling, starts and reverts, supersession, cancel, and the deadline sweeper, through every
service running as its own process on a real broker, Redis and database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from dercmd.events import CommandAcceptedV1, CommandType, revert_id
from dercmd.launcher import Stack
from dercmd.ledger import Ledger

from ..conftest import wait_for
from .conftest import Api, Kafka, running_stack

pytestmark = pytest.mark.e2e

PV = [f"pv-w{i}" for i in range(1, 41)]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fleet = {
        "entities": {
            **{e: {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"} for e in PV},
            "pv-cool": {"kind": "PV", "vendor": "fronius", "backend": "vendor-cloud", "cooldownS": 600},
            "ev-w1": {"kind": "EV", "vendor": "tesla", "backend": "vendor-cloud"},
            "dev-1": {"kind": "PV", "vendor": "gridbox", "backend": "native-window", "assets": ["inverter-a", "inverter-b"]},
        },
        "cooldowns": {"PV": 0},
        "tokens": {
            "dev-contributor": [{"entities": "*", "role": "Contributor"}],
            "dev-viewer": [{"entities": "*", "role": "Viewer"}],
            "dev-partner": [{"entities": "pv-w1*", "role": "Contributor"}],
        },
    }
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    yield from running_stack(request, tmp_path_factory, fleet_file=path, deadline_pending_s="2",
                             deadline_triggered_s="2", sweep_interval_s="0.5")


@pytest.fixture(scope="module")
def devices() -> Iterator[Iterator[str]]:
    """A device no other test of the module has used."""
    yield iter(PV)


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def batch(devices: list[str], start: str, end: str, percentage: int = 30, **extra: Any) -> dict[str, Any]:
    return {"command": {"type": "limitProductionPower", "percentage": percentage, "startAt": start, "endAt": end, **extra},
            "deviceHashIds": devices}


def received_ids(api: Api, entity_id: str) -> list[str]:
    return [c["commandId"] for c in api.received(entity_id)]


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "key"),
    [
        (lambda d: batch(d, at(2**31 / 1000 + 60), at(2**31 / 1000 + 120)), 400, "start_at_too_far_in_future"),
        (lambda d: batch(d, at(-120), at(-60)), 400, "end_at_in_the_past"),
        (lambda d: batch(d, at(10), at(10 + 2**31 / 1000)), 400, "interval_too_long"),
        (lambda d: batch([*d, "pv-nope"], at(10), at(20)), 400, "unknown_device_hash_id"),
        (lambda d: batch(d, at(10), at(20), percentage=101), 400, "validation_error"),
        (lambda d: batch(d, at(10), at(20), percentage=50.5), 400, "validation_error"),
        (lambda d: batch(d, at(20), at(10)), 400, "validation_error"),
        (lambda d: batch([f"pv-x{i}" for i in range(101)], at(10), at(20)), 400, "validation_error"),
        (lambda d: batch([], at(10), at(20)), 400, "validation_error"),
    ],
    ids=["too-far", "end-past", "too-long", "unknown-id", "pct-101", "pct-float", "end-before-start", "101-ids", "no-ids"],
)
def test_a_refused_batch_reaches_no_device(api: Api, body: Any, status: int, key: str) -> None:
    targets = ["pv-w39", "pv-w40"]  # never sent anything by this module
    answer = api.batch(body(targets))
    assert (answer.status_code, answer.json()["key"]) == (status, key), answer.text
    assert [received_ids(api, d) for d in targets] == [[], []]


def test_batch_auth_contributor_on_every_device(api: Api) -> None:
    body = batch(["pv-w39", "pv-w40"], at(10), at(20))
    assert api.batch(body, token="nope").status_code == 401
    assert api.batch(body, token="dev-viewer").json()["key"] == "forbidden"
    # dev-partner may see pv-w1*, not pv-w39: the same 404 as for a device that does not exist
    assert (r := api.batch({**body, "deviceHashIds": ["pv-w10", "pv-w39"]}, token="dev-partner")).status_code == 404, r.text
    assert [received_ids(api, d) for d in ("pv-w10", "pv-w39", "pv-w40")] == [[], [], []]


def test_a_device_that_cannot_limit_production_refuses_the_whole_batch(api: Api) -> None:
    answer = api.batch(batch(["pv-w39", "ev-w1"], at(10), at(20)))
    assert (answer.status_code, answer.json()["key"]) == (400, "command_not_supported"), answer.text
    assert [received_ids(api, d) for d in ("pv-w39", "ev-w1")] == [[], []]


# -- windows ----------------------------------------------------------------------------


def test_a_window_starts_now_and_is_reverted_at_its_end(api: Api, devices: Iterator[str]) -> None:
    targets = [next(devices), next(devices), next(devices)]
    end = datetime.now(UTC) + timedelta(seconds=3)
    created = api.batch(batch(targets, at(0), end.isoformat(), percentage=40))
    assert created.status_code == 201, created.text
    ids = {c["deviceHashId"]: c["id"] for c in created.json()["commands"]}
    assert sorted(ids) == sorted(targets)
    for device, command_id in ids.items():
        state = api.wait_terminal(command_id)
        assert (state["status"], state["percentage"], state["type"]) == ("Succeeded", 40, "LimitProductionPower"), state
        assert {"startAt", "endAt"} <= state.keys()
        revert = api.wait_terminal(revert_id(command_id), deadline_s=30)
        assert (revert["status"], revert["revertOf"], revert["percentage"]) == ("Succeeded", command_id, 100), revert
        assert received_ids(api, device) == [command_id, revert_id(command_id)]
        reverted_at = datetime.fromisoformat(api.received(device)[1]["receivedAt"])
        assert reverted_at >= end


def test_a_scheduled_window_starts_at_its_start(api: Api, devices: Iterator[str]) -> None:
    device = next(devices)
    start = datetime.now(UTC) + timedelta(seconds=2)
    created = api.batch(batch([device], start.isoformat(), (start + timedelta(seconds=2)).isoformat()))
    command_id = created.json()["commands"][0]["id"]
    assert api.get(command_id).json()["status"] == "Pending"
    assert api.wait_terminal(command_id)["status"] == "Succeeded"
    first = api.received(device)[0]
    assert first["commandId"] == command_id and datetime.fromisoformat(first["receivedAt"]) >= start
    wait_for(lambda: len(api.received(device)) == 2, deadline_s=20, what="the revert")


def test_a_newer_window_supersedes_a_scheduled_one(api: Api, devices: Iterator[str]) -> None:
    device = next(devices)
    first = api.batch(batch([device], at(30), at(60))).json()["commands"][0]["id"]
    second = api.batch(batch([device], at(1), at(3))).json()["commands"][0]["id"]
    canceled = api.wait_terminal(first)
    assert (canceled["status"], canceled["reason"], canceled["supersededBy"]) == ("Canceled", "superseded", second)
    assert api.wait_terminal(second)["status"] == "Succeeded"
    wait_for(lambda: received_ids(api, device) == [second, revert_id(second)], deadline_s=20, what="the second window and its revert")


def test_an_immediate_command_supersedes_a_delivered_window_which_is_then_not_reverted(api: Api, devices: Iterator[str]) -> None:
    device = next(devices)
    window = api.batch(batch([device], at(0), at(2))).json()["commands"][0]["id"]
    assert api.wait_terminal(window)["status"] == "Succeeded"
    stop = api.post(device, {"type": "StopFeedIn"}).json()["id"]
    assert api.wait_terminal(stop)["status"] == "Succeeded"
    # The window's end passes: the device keeps the newer command, no revert
    wait_for(lambda: datetime.now(UTC) > datetime.fromisoformat(api.get(window).json()["endAt"]) + timedelta(seconds=2),
             deadline_s=10, what="the window's end to pass")
    assert received_ids(api, device) == [window, stop]
    # Its end was acted on up to DERCMD_DUE_LEAD_MS ahead: a revert may exist, superseded.
    revert = api.get(revert_id(window))
    assert revert.status_code == 404 or (revert.json()["status"], revert.json()["reason"]) == ("Canceled", "superseded")


def test_schedule_endpoint(api: Api, devices: Iterator[str]) -> None:
    device = next(devices)
    start = datetime.now(UTC) + timedelta(seconds=1)
    answer = api.schedule(device, [
        {"triggerTime": start.isoformat(), "type": "LimitFeedIn", "value": 1000},
        {"triggerTime": (start + timedelta(seconds=1)).isoformat(), "type": "StopFeedIn"},
    ])
    assert answer.status_code == 201, answer.text
    first, second = (c["id"] for c in answer.json()["commands"])
    assert [c["status"] for c in answer.json()["commands"]] == ["Pending", "Pending"]
    # Both are due later: the second takes the scheduled slot from the first (rule 3).
    assert api.wait_terminal(first)["reason"] == "superseded"
    assert api.wait_terminal(second)["status"] == "Succeeded"
    (got,) = api.received(device)
    assert got["commandId"] == second and datetime.fromisoformat(got["receivedAt"]) >= start + timedelta(seconds=1)
    refused = api.schedule(device, [{"triggerTime": "2026-01-01T00:00:00", "type": "StopFeedIn"}])
    assert (refused.status_code, refused.json()["key"]) == (400, "validation_error")  # no time zone


def test_a_scheduled_command_due_inside_the_cooldown_waits_or_expires(api: Api) -> None:
    first = api.post("pv-cool", {"type": "StopFeedIn"}).json()["id"]
    assert api.wait_terminal(first)["status"] == "Succeeded"  # cooldown of 10 minutes from now
    window = api.batch(batch(["pv-cool"], at(1), at(3))).json()["commands"][0]["id"]
    ended = api.wait_terminal(window, deadline_s=20)
    assert (ended["status"], ended["reason"]) == ("Canceled", "expired"), ended
    assert received_ids(api, "pv-cool") == [first]


def test_a_native_window_is_sent_once_with_its_assets_and_reported(api: Api, kafka: Kafka) -> None:
    refused = api.batch(batch(["dev-1"], at(1), at(3), assetIdentifiers=["inverter-z"]))
    assert (refused.status_code, refused.json()["key"]) == (400, "unknown_asset_identifier")
    end = datetime.now(UTC) + timedelta(seconds=3)
    created = api.batch(batch(["dev-1"], at(1), end.isoformat(), percentage=10, assetIdentifiers=["inverter-a", "inverter-z"]))
    assert created.status_code == 201, created.text
    command_id = created.json()["commands"][0]["id"]
    assert api.wait_terminal(command_id)["status"] == "Succeeded"
    (entry,) = api.received("dev-1")
    assert (entry["commandId"], entry["percentage"], entry["assets"]) == (command_id, 10, ["inverter-a"])
    assert datetime.fromisoformat(entry["endAt"]) == end.replace(microsecond=end.microsecond // 1000 * 1000)
    # The device returns to its default by itself: no revert from dercmd, even after the end.
    wait_for(lambda: datetime.now(UTC) > end + timedelta(seconds=3), deadline_s=10, what="the window's end")
    assert [c["commandId"] for c in api.received("dev-1")] == [command_id]
    reports = kafka.read_until("dercmd.devices.reports", lambda rs: any(json.loads(r.value).get("commandId") == command_id for r in rs))
    assert any(json.loads(r.value)["entityId"] == "dev-1" for r in reports)


# -- cancel -----------------------------------------------------------------------------


def test_delete_in_each_state(api: Api, devices: Iterator[str]) -> None:
    scheduled_on, window_on = next(devices), next(devices)
    scheduled = api.batch(batch([scheduled_on], at(60), at(120))).json()["commands"][0]["id"]
    answer = api.delete(scheduled)
    assert answer.status_code == 202, answer.text
    canceled = api.wait_terminal(scheduled)
    assert (canceled["status"], canceled["reason"]) == ("Canceled", "canceled") and canceled["detail"].startswith("canceled by token:")

    window = api.batch(batch([window_on], at(0), at(300))).json()["commands"][0]["id"]
    assert api.wait_terminal(window)["status"] == "Succeeded"
    assert api.delete(window).status_code == 202  # an active window, delivered: ends now
    assert api.wait_terminal(revert_id(window))["status"] == "Succeeded"
    assert received_ids(api, window_on) == [window, revert_id(window)]

    assert (r := api.delete(scheduled)).status_code == 409 and r.json()["key"] == "command_finished"
    assert api.delete(revert_id(window)).json()["key"] == "command_finished"
    assert api.delete(str(uuid.uuid4())).status_code == 404
    assert api.delete(window, token="dev-viewer").status_code == 403


# -- Kafka --------------------------------------------------------------------------------


def test_the_same_window_is_accepted_on_kafka_and_refused_there_with_the_same_keys(api: Api, kafka: Kafka, devices: Iterator[str]) -> None:
    device = next(devices)
    good, bad = f"kw-{uuid.uuid4()}", f"kw-{uuid.uuid4()}"
    window = {"type": "LimitProductionPower", "percentage": 10, "startAt": at(0), "endAt": at(2)}
    kafka.produce("dercmd.commands.requests", [
        (device.encode(), json.dumps({"id": good, "entityId": device, **window}).encode(), []),
        (device.encode(), json.dumps({"id": bad, "entityId": device, **window, "endAt": at(-5)}).encode(), []),
    ])
    assert api.wait_terminal(good)["status"] == "Succeeded"
    taken = f"kw-{uuid.uuid4()}:revert"
    kafka.produce("dercmd.commands.requests", [(device.encode(), json.dumps({"id": taken, "entityId": device, "type": "StopFeedIn"}).encode(), [])])
    assert (api.wait_terminal(taken)["status"], api.get(taken).json()["reason"]) == ("Rejected", "validation_error")
    rejected = api.wait_terminal(bad)
    assert (rejected["status"], rejected["reason"]) == ("Rejected", "end_at_in_the_past")
    wait_for(lambda: received_ids(api, device) == [good, revert_id(good)], deadline_s=20, what="the window and its revert")


# -- deadlines ----------------------------------------------------------------------------


def test_a_command_that_never_reached_arbitration_ends_failed_expired(api: Api, stack: Stack, devices: Iterator[str]) -> None:
    """As if the broker lost its accepted event: in the ledger as Pending, unknown elsewhere."""
    device = next(devices)
    ledger = Ledger(stack.settings.database_url)
    lost = CommandAcceptedV1(id=f"lost-{uuid.uuid4()}", entity_id=device, type=CommandType.STOP_FEED_IN,
                             accepted_at=datetime.now(UTC), source="test")
    ledger.record_pending_many([lost])
    ledger.close()
    state = api.wait_terminal(lost.id, deadline_s=30)
    assert (state["status"], state["reason"]) == ("Failed", "expired"), state
    assert received_ids(api, device) == []


def test_expires_at_ends_a_command_not_delivered_in_time(api: Api, kafka: Kafka, devices: Iterator[str]) -> None:
    device = next(devices)
    command_id = f"exp-{uuid.uuid4()}"
    request = {"id": command_id, "entityId": device, "type": "StopFeedIn", "startAt": at(60), "expiresAt": at(1)}
    kafka.produce("dercmd.commands.requests", [(device.encode(), json.dumps(request).encode(), [])])
    state = api.wait_terminal(command_id, deadline_s=30)
    assert (state["status"], state["reason"]) == ("Failed", "expired"), state
    assert "expiresAt" in state["detail"]


# -- the operator CLI -----------------------------------------------------------------------


def test_the_operator_cli_sends_a_batch_and_watches_it_to_the_end(api: Api, stack: Stack, devices: Iterator[str],
                                                                  tmp_path: Path) -> None:
    targets = [next(devices), next(devices)]
    (tmp_path / "devices.txt").write_text("\n".join(targets) + "\n")
    env = {**os.environ, "DERCMD_API_URL": stack.url("intake"), "DERCMD_TOKEN": "dev-contributor"}
    dercmd = str(Path(sys.executable).with_name("dercmd"))
    sent = subprocess.run([dercmd, "batch", "--percentage", "20", "--start", "+1s", "--end", "+3s", "--devices",
                           str(tmp_path / "devices.txt"), "--out", str(tmp_path / "sent.json"), "--watch", "30"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr  # 0: every command Succeeded
    ids = [c["id"] for c in json.loads((tmp_path / "sent.json").read_text())["commands"]]
    assert [api.get(i).json()["status"] for i in ids] == ["Succeeded", "Succeeded"]
    refused = subprocess.run([dercmd, "--token", "dev-viewer", "batch", "--percentage", "20", "--start", "+1s", "--end", "+3s",
                              "--devices", str(tmp_path / "devices.txt")], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "forbidden" in refused.stderr, refused.stdout + refused.stderr
