"""The two public API documents dercmd follows, tried verbatim against the running example
stack (`make run`'s fleet and tokens, its 10-minute cooldown), each request as the document
shows it, adapted only to the fleet's ids and tokens, and each answer checked for the fields
the document shows (issue 19, item 7).

- ``seeds/000_29b5f8e61b3e65b9.txt``, the Commands API (one entity at a time): ``type`` and
  ``value`` (documented as a string), the answer ``{id, entityId, status: Pending, triggerTime,
  type}``, retrieving the command, the cooldown and ``ignoreCooldown``, Contributor permission,
  and the compatibility table with its footnotes.
- ``seeds/003_c64f689e3b3913b5.txt``, the batch API (``POST /v1/command/``): the body with
  ``startAt``/``endAt`` as a JavaScript ``Date`` serialises them, ``assetIdentifiers``, rules
  1-3, the extra measurement report after ``startAt`` and ``endAt``, and the four documented
  error keys.

Tests that deliver use entities no other test of the module touches, in file order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from dercmd.events import revert_id
from dercmd.launcher import Stack

from .conftest import Api, Kafka, running_stack

pytestmark = pytest.mark.e2e

CONTRIBUTOR = {"Authorization": "Bearer dev-contributor"}
STATUSES = {"Canceled", "Failed", "Pending", "Sent", "Succeeded", "Triggered"}  # the Commands API's list


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The example fleet with the shipped settings (the 10-minute cooldown included)."""
    yield from running_stack(request, tmp_path_factory)


def date(seconds: float) -> str:
    """A time as the batch API's ``Date`` is sent by JavaScript (``toISOString()``)."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trigger(api: Api, entity_id: str, body: dict[str, Any], **params: str) -> httpx.Response:
    """The Commands API's "Trigger a Command for an Entity"."""
    return api.http.post(f"/v1/entities/{entity_id}/commands", json=body, headers=CONTRIBUTOR, params=params)


def command(api: Api, body: dict[str, Any]) -> httpx.Response:
    """The batch API's ``POST /v1/command/``."""
    return api.http.post("/v1/command/", json=body, headers=CONTRIBUTOR)


def received(api: Api, entity_id: str) -> list[dict[str, Any]]:
    return api.received(entity_id)


def reported(kafka: Kafka, entity_id: str, command_ids: set[str], since: datetime) -> None:
    """The device sent a measurement report for one of these commands (the batch API's extra
    report), or a periodic one within 3 s of ``since`` (then none extra is sent)."""
    def found(records: list[Any]) -> bool:
        reports = [json.loads(r.value) for r in records]
        return any(r["entityId"] == entity_id and (r.get("commandId") in command_ids
                                                   or since <= datetime.fromisoformat(r["at"]) <= since + timedelta(seconds=4))
                   for r in reports)

    kafka.read_until("dercmd.devices.reports", found)


# -- the Commands API -----------------------------------------------------------------------


def test_commands_api_lets_try_it_out_a_reset_is_pending_then_retrieved(api: Api) -> None:
    """"Let's try it out": ``{"type": "Reset"}`` for an entity; the answer the document shows
    (``id``, ``entityId``, ``status: Pending``, ``triggerTime``, ``type``); then "Retrieving
    your Command" shows one of the documented statuses until it has run."""
    answer = trigger(api, "pv-3", {"type": "Reset"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["entityId"], body["status"], body["type"]) == ("pv-3", "Pending", "Reset")
    uuid.UUID(body["id"])
    assert abs(datetime.fromisoformat(body["triggerTime"]) - datetime.now(UTC)) < timedelta(seconds=30)
    fetched = api.get(body["id"])
    assert fetched.status_code == 200 and fetched.json()["status"] in STATUSES
    assert api.wait_terminal(body["id"])["status"] == "Succeeded"
    assert [(c["commandId"], c["type"]) for c in received(api, "pv-3")] == [(body["id"], "Reset")]


def test_commands_api_the_cooldown_and_ignore_cooldown(api: Api) -> None:
    """"The cooldown period lasts 10 minutes. You can disable [it] by setting the
    ignoreCooldown query parameter to true." (pv-3 took a Reset in the test before.)"""
    refused = trigger(api, "pv-3", {"type": "StopFeedIn"})
    assert (refused.status_code, refused.json()["key"]) == (409, "cooldown_active"), refused.text
    left = datetime.fromisoformat(refused.json()["cooldownUntil"]) - datetime.now(UTC)
    assert timedelta(minutes=9) < left <= timedelta(minutes=10)
    forced = trigger(api, "pv-3", {"type": "StopFeedIn"}, ignoreCooldown="true")
    assert forced.status_code == 201, forced.text
    assert api.wait_terminal(forced.json()["id"])["status"] == "Succeeded"
    assert [c["type"] for c in received(api, "pv-3")] == ["Reset", "StopFeedIn"]


def test_commands_api_value_as_documented_a_string_with_the_limit_in_watts(api: Api) -> None:
    """``value`` is documented as a string ("Limit in W" for LimitFeedIn): ``"3000"`` is 3000 W."""
    answer = trigger(api, "pv-1", {"type": "LimitFeedIn", "value": "3000"})
    assert answer.status_code == 201, answer.text
    assert (answer.json()["status"], answer.json()["type"], answer.json()["value"]) == ("Pending", "LimitFeedIn", 3000)
    assert api.wait_terminal(answer.json()["id"])["status"] == "Succeeded"
    assert [(c["type"], c["value"]) for c in received(api, "pv-1")] == [("LimitFeedIn", 3000)]
    for bad in ("3.5", "abc", "-1", "", True, 3000.5, "99999999999"):
        refused = trigger(api, "pv-1", {"type": "LimitFeedIn", "value": bad}, ignoreCooldown="true")
        assert (refused.status_code, refused.json()["key"]) == (400, "validation_error"), bad
    # N/A: the other types take no value.
    refused = trigger(api, "pv-1", {"type": "Reset", "value": "3000"}, ignoreCooldown="true")
    assert (refused.status_code, refused.json()["key"]) == (400, "validation_error")


def test_commands_api_value_as_a_string_in_a_schedule_and_a_kafka_request(api: Api, kafka: Kafka) -> None:
    """The same string form in a scheduled command and in a Kafka request."""
    answer = api.schedule("pv-2", [{"triggerTime": date(2), "type": "LimitFeedIn", "value": "2500"}])
    assert answer.status_code == 201, answer.text
    (scheduled,) = answer.json()["commands"]
    assert (scheduled["status"], scheduled["value"]) == ("Pending", 2500)
    assert api.wait_terminal(scheduled["id"])["status"] == "Succeeded"
    request_id = f"seed-{uuid.uuid4()}"
    kafka.produce("dercmd.commands.requests", [(b"pv-2", json.dumps(
        {"id": request_id, "entityId": "pv-2", "type": "LimitFeedIn", "value": "1500", "ignoreCooldown": True}).encode(), [])])
    assert api.wait_terminal(request_id)["status"] == "Succeeded"
    assert [(c["commandId"], c["value"]) for c in received(api, "pv-2")] == [(scheduled["id"], 2500), (request_id, 1500)]


def test_commands_api_what_you_need_a_token_with_contributor_permission(api: Api) -> None:
    anonymous = api.http.post("/v1/entities/ev-1/commands", json={"type": "StartCharging"})
    assert (anonymous.status_code, anonymous.json()["key"]) == (401, "unauthorized")
    viewer = api.http.post("/v1/entities/ev-1/commands", json={"type": "StartCharging"},
                           headers={"Authorization": "Bearer dev-viewer"})
    assert (viewer.status_code, viewer.json()["key"]) == (403, "forbidden")


# -- the batch API ------------------------------------------------------------------------


def test_batch_api_a_window_now_is_activated_reported_and_ended(api: Api, kafka: Kafka) -> None:
    """The document's body; rule 2 (startAt in the past: activated at once); 201 "received by
    the cloud"; the device gets ``percentage`` and returns to its default after ``endAt``; an
    extra measurement report after ``startAt`` and after ``endAt``."""
    end = date(4)
    answer = command(api, {"command": {"type": "limitProductionPower", "percentage": 30, "startAt": date(-1), "endAt": end},
                           "deviceHashIds": ["pv-4"]})
    assert answer.status_code == 201, answer.text
    ((device, command_id),) = [(c["deviceHashId"], c["id"]) for c in answer.json()["commands"]]
    assert device == "pv-4"
    assert api.wait_terminal(command_id)["status"] == "Succeeded"
    assert api.wait_terminal(revert_id(command_id))["status"] == "Succeeded"
    got = received(api, "pv-4")
    assert [(c["commandId"], c["percentage"]) for c in got] == [(command_id, 30), (revert_id(command_id), 100)]
    assert datetime.fromisoformat(got[1]["receivedAt"]) >= datetime.fromisoformat(end)
    for receipt in got:  # after startAt, and after endAt
        reported(kafka, "pv-4", {command_id, revert_id(command_id)}, datetime.fromisoformat(receipt["receivedAt"]))


def test_batch_api_rule_3_a_later_window_replaces_the_scheduled_one_and_asset_identifiers(api: Api) -> None:
    """Rule 3 (startAt in the future: scheduled, overwriting an existing scheduled command),
    and ``assetIdentifiers``: only the listed inverters of the device take it."""
    first = command(api, {"command": {"type": "limitProductionPower", "percentage": 0, "startAt": date(60), "endAt": date(120)},
                          "deviceHashIds": ["dev-1"]})
    second = command(api, {"command": {"type": "limitProductionPower", "percentage": 20, "startAt": date(2), "endAt": date(5),
                                       "assetIdentifiers": ["inverter-a"]}, "deviceHashIds": ["dev-1"]})
    assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
    first_id, second_id = first.json()["commands"][0]["id"], second.json()["commands"][0]["id"]
    replaced = api.wait_terminal(first_id)
    assert (replaced["status"], replaced["reason"], replaced["supersededBy"]) == ("Canceled", "superseded", second_id)
    assert api.wait_terminal(second_id)["status"] == "Succeeded"
    (got,) = received(api, "dev-1")
    assert (got["commandId"], got["percentage"], got["assets"]) == (second_id, 20, ["inverter-a"])


@pytest.mark.xfail(strict=True, reason="issue 19 item 3 (not this branch): with the shipped 10-minute cooldown a window "
                                       "that starts now on a device that took a command less than 10 minutes ago ends "
                                       "Failed: cooldown_active, and the batch API takes no ignoreCooldown")
def test_batch_api_rule_2_a_window_now_replaces_the_active_one_and_deletes_the_scheduled_one(api: Api) -> None:
    """Rule 2 on a device that holds an active window and a scheduled one (pv-4 took the
    first window of this module less than 10 minutes ago)."""
    active = command(api, {"command": {"type": "limitProductionPower", "percentage": 50, "startAt": date(-1), "endAt": date(300)},
                           "deviceHashIds": ["pv-4"]})
    scheduled = command(api, {"command": {"type": "limitProductionPower", "percentage": 60, "startAt": date(200),
                                          "endAt": date(300)}, "deviceHashIds": ["pv-4"]})
    now = command(api, {"command": {"type": "limitProductionPower", "percentage": 70, "startAt": date(-1), "endAt": date(300)},
                        "deviceHashIds": ["pv-4"]})
    ids = [a.json()["commands"][0]["id"] for a in (active, scheduled, now)]
    assert api.wait_terminal(ids[2])["status"] == "Succeeded"
    deleted = api.wait_terminal(ids[1])
    assert (deleted["status"], deleted["reason"]) == ("Canceled", "superseded")
    assert received(api, "pv-4")[-1]["commandId"] == ids[2]


@pytest.mark.parametrize(("body", "key"), [
    (lambda: {"startAt": date(2**31 / 1000 + 60), "endAt": date(2**31 / 1000 + 120)}, "start_at_too_far_in_future"),
    (lambda: {"startAt": date(-120), "endAt": date(-60)}, "end_at_in_the_past"),  # rule 1: nothing is sent
    (lambda: {"startAt": date(10), "endAt": date(10 + 2**31 / 1000)}, "interval_too_long"),
    (lambda: {"startAt": date(10), "endAt": date(20), "devices": ["pv-4", "no-such-device"]}, "unknown_device_hash_id"),
    (lambda: {"startAt": date(10), "endAt": date(20), "percentage": 101}, "validation_error"),  # "<= 100"
    (lambda: {"startAt": date(10), "endAt": date(20), "percentage": -1}, "validation_error"),  # "non-negative"
    (lambda: {"startAt": date(10), "endAt": date(20), "percentage": 12.5}, "validation_error"),  # "integer"
    (lambda: {"startAt": date(10), "endAt": date(20), "devices": [f"pv-x{i}" for i in range(101)]}, "validation_error"),
], ids=["start-too-far", "end-in-the-past", "interval-too-long", "unknown-device", "percentage-101", "percentage-negative",
        "percentage-fraction", "101-devices"])
def test_batch_api_the_documented_error_responses(api: Api, body: Any, key: str) -> None:
    spec = body()
    devices = spec.pop("devices", ["pv-4"])
    sent = {"command": {"type": "limitProductionPower", "percentage": spec.pop("percentage", 30), **spec}, "deviceHashIds": devices}
    before = len(received(api, "pv-4"))
    answer = command(api, sent)
    assert (answer.status_code, answer.json()["key"]) == (400, key), answer.text
    assert len(received(api, "pv-4")) == before


def test_commands_api_the_compatibility_table_and_its_footnotes(api: Api) -> None:
    """Every type on every kind of the table: supported ones are accepted, the others refused
    with ``command_not_supported`` (footnote 1: BMW charges only through the EV aggregator;
    2: an OCPP charge point may not support charging commands; 3: Huawei cannot Disconnect).
    Last in the module: it sends to most entities."""
    table = {"StartCharging": {"EV", "CP"}, "StopCharging": {"EV", "CP"}, "Reset": {"PV"}, "Disconnect": {"PV"},
             "LimitFeedIn": {"PV"}, "StopFeedIn": {"PV"}}
    kinds = {"ev-1": "EV", "ev-3": "EV", "ev-4": "EV", "cp-1": "CP", "cp-2": "CP", "cp-3": "CP", "pv-1": "PV", "pv-3": "PV"}
    exceptions = {("ev-4", "StartCharging"), ("ev-4", "StopCharging"),  # BMW, not through the EV aggregator (ev-3 is)
                  ("cp-3", "StartCharging"), ("cp-3", "StopCharging"),  # an OCPP charge point that declared neither
                  ("pv-1", "Disconnect")}  # Huawei
    outcome = {}
    for entity_id, kind in kinds.items():
        for command_type, supported_on in table.items():
            body = {"type": command_type, **({"value": "1000"} if command_type == "LimitFeedIn" else {})}
            answer = trigger(api, entity_id, body, ignoreCooldown="true")
            outcome[(entity_id, command_type)] = answer.json().get("key", answer.status_code)
    expected = {(e, t): 201 if kinds[e] in table[t] and (e, t) not in exceptions else "command_not_supported"
                for e in kinds for t in table}
    assert outcome == expected
