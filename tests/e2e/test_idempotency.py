"""Idempotency keys on every POST end to end (issue 19, item 2): a retried POST with the same
``Idempotency-Key`` creates one command and the device receives it once (entity commands,
schedules, the batch API), the same key with another request is refused, concurrent retries
never make a second command, two callers' keys are their own, and an error answer is not
kept. Every service its own process, a real broker, Redis and ledger."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import yaml

from dercmd.launcher import Stack

from .conftest import Api, running_stack

pytestmark = pytest.mark.e2e

PV = [f"pv-i{i}" for i in range(1, 21)]
EV = ["ev-i1", "ev-i2"]


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fleet = {
        "entities": {**{e: {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"} for e in PV},
                     **{e: {"kind": "EV", "vendor": "tesla", "backend": "vendor-cloud"} for e in EV}},
        "cooldowns": {"PV": 0, "EV": 0},
        "tokens": {"dev-contributor": [{"entities": "*", "role": "Contributor"}],
                   "dev-partner": [{"entities": "*", "role": "Contributor"}]},
    }
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    yield from running_stack(request, tmp_path_factory, fleet_file=path)


@pytest.fixture(scope="module")
def devices() -> Iterator[Iterator[str]]:
    """A PV device no other test of the module has used."""
    yield iter(PV)


def post(api: Api, path: str, body: Any, key: str | None, token: str = "dev-contributor", **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", **({"Idempotency-Key": key} if key is not None else {})}
    return api.http.post(path, json=body, headers=headers, params=params)


def entity_commands(api: Api, entity_id: str) -> list[str]:
    page = api.http.get(f"/v1/entities/{entity_id}/commands", headers={"Authorization": "Bearer dev-contributor"})
    return [c["id"] for c in page.json()["items"]]


def received_ids(api: Api, entity_id: str) -> list[str]:
    return [c["commandId"] for c in api.received(entity_id)]


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def test_without_a_key_a_retried_post_is_a_second_command(api: Api, devices: Iterator[str]) -> None:
    """What the key is for: without it, a retry is another command (and another delivery)."""
    device = next(devices)
    first, second = (post(api, f"/v1/entities/{device}/commands", {"type": "StopFeedIn"}, None) for _ in range(2))
    assert first.json()["id"] != second.json()["id"]
    assert "Idempotency-Replayed" not in second.headers


def test_a_retried_post_with_the_same_key_creates_one_command_delivered_once(api: Api, devices: Iterator[str]) -> None:
    device, key = next(devices), str(uuid.uuid4())
    body = {"type": "LimitFeedIn", "value": 3000}
    first = post(api, f"/v1/entities/{device}/commands", body, key)
    assert first.status_code == 201, first.text
    command_id = first.json()["id"]
    assert api.wait_terminal(command_id)["status"] == "Succeeded"
    # The client did not see the answer and retries: the same key, the same request (the
    # body written differently: compared as JSON). The first answer again, nothing new.
    retried = api.http.post(f"/v1/entities/{device}/commands", content=b'{ "value" : 3000,  "type": "LimitFeedIn" }',
                            headers={"Authorization": "Bearer dev-contributor", "Idempotency-Key": key,
                                     "Content-Type": "application/json"})
    assert (retried.status_code, retried.json(), retried.headers["Location"]) == (201, first.json(), first.headers["Location"])
    assert retried.headers["Idempotency-Replayed"] == "true"
    # The draft's structured-field form ("key" in quotes) is the same key.
    quoted = post(api, f"/v1/entities/{device}/commands", body, f'"{key}"')
    assert (quoted.status_code, quoted.json()["id"]) == (201, command_id)
    assert entity_commands(api, device) == [command_id]
    assert received_ids(api, device) == [command_id]
    replays = [line for line in api.http.get("/metrics").text.splitlines()
               if line.startswith("dercmd_intake_idempotent_replays_total ")]
    assert replays and float(replays[0].split()[1]) >= 2


def test_the_same_key_with_another_request_is_refused_and_creates_nothing(api: Api, devices: Iterator[str]) -> None:
    device, other, key = next(devices), next(devices), str(uuid.uuid4())
    first = post(api, f"/v1/entities/{device}/commands", {"type": "LimitFeedIn", "value": 3000}, key)
    assert first.status_code == 201, first.text
    for path, body, params in [
        (f"/v1/entities/{device}/commands", {"type": "LimitFeedIn", "value": 2000}, {}),  # another body
        (f"/v1/entities/{other}/commands", {"type": "LimitFeedIn", "value": 3000}, {}),  # another entity
        (f"/v1/entities/{device}/commands", {"type": "LimitFeedIn", "value": 3000}, {"ignoreCooldown": "true"}),  # another query
        ("/v1/command/", {"command": {"type": "limitProductionPower", "percentage": 30, "startAt": at(0), "endAt": at(5)},
                          "deviceHashIds": [device]}, {}),  # another route
    ]:
        refused = post(api, path, body, key, **params)
        assert (refused.status_code, refused.json()["key"]) == (422, "idempotency_key_reused"), (path, refused.text)
    assert api.wait_terminal(first.json()["id"])["status"] == "Succeeded"
    assert entity_commands(api, device) == [first.json()["id"]] and entity_commands(api, other) == []
    assert received_ids(api, device) == [first.json()["id"]] and received_ids(api, other) == []


def test_concurrent_retries_with_one_key_make_one_command(api: Api, devices: Iterator[str]) -> None:
    """A client that retries before its first request was answered: 409 in use, or the
    replayed answer; never a second command."""
    device, key = next(devices), str(uuid.uuid4())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(api, f"/v1/entities/{device}/commands", {"type": "StopFeedIn"}, key), range(8)))
    created = {a.json()["id"] for a in answers if a.status_code == 201}
    in_use = [a for a in answers if a.status_code == 409]
    assert len(created) == 1 and len(in_use) + sum(a.status_code == 201 for a in answers) == 8, [a.text for a in answers]
    assert all(a.json()["key"] == "idempotency_key_in_use" and a.headers["Retry-After"] for a in in_use)
    (command_id,) = created
    assert api.wait_terminal(command_id)["status"] == "Succeeded"
    assert entity_commands(api, device) == [command_id] and received_ids(api, device) == [command_id]


def test_a_retried_schedule_with_the_same_key_is_scheduled_once(api: Api) -> None:
    key, device = str(uuid.uuid4()), "ev-i1"
    items = [{"triggerTime": at(2), "type": "StartCharging"}]
    first = post(api, f"/v1/entities/{device}/commands/schedule", items, key)
    assert first.status_code == 201, first.text
    retried = post(api, f"/v1/entities/{device}/commands/schedule", items, key)
    assert (retried.status_code, retried.json(), retried.headers["Idempotency-Replayed"]) == (201, first.json(), "true")
    changed = post(api, f"/v1/entities/{device}/commands/schedule", [{**items[0], "type": "StopCharging"}], key)
    assert (changed.status_code, changed.json()["key"]) == (422, "idempotency_key_reused")
    (command_id,) = (c["id"] for c in first.json()["commands"])
    assert api.wait_terminal(command_id)["status"] == "Succeeded"
    assert entity_commands(api, device) == [command_id] and received_ids(api, device) == [command_id]


def test_a_retried_batch_with_the_same_key_reaches_each_device_once(api: Api, devices: Iterator[str]) -> None:
    key, targets = str(uuid.uuid4()), [next(devices), next(devices), next(devices)]
    body = {"command": {"type": "limitProductionPower", "percentage": 40, "startAt": at(0), "endAt": at(60)},
            "deviceHashIds": targets}
    first = post(api, "/v1/command/", body, key)
    assert first.status_code == 201, first.text
    retried = post(api, "/v1/command/", body, key)
    assert (retried.status_code, retried.json(), retried.headers["Idempotency-Replayed"]) == (201, first.json(), "true")
    other = post(api, "/v1/command/", {**body, "command": {**body["command"], "percentage": 50}}, key)
    assert (other.status_code, other.json()["key"]) == (422, "idempotency_key_reused")
    for created in first.json()["commands"]:
        assert api.wait_terminal(created["id"])["status"] == "Succeeded"
        assert entity_commands(api, created["deviceHashId"]) == [created["id"]]
        assert received_ids(api, created["deviceHashId"]) == [created["id"]]


def test_two_callers_keys_are_their_own(api: Api, devices: Iterator[str]) -> None:
    device, key = next(devices), str(uuid.uuid4())
    mine = post(api, f"/v1/entities/{device}/commands", {"type": "StopFeedIn"}, key)
    assert mine.status_code == 201, mine.text
    assert api.wait_terminal(mine.json()["id"])["status"] == "Succeeded"  # else the second would supersede it
    theirs = post(api, f"/v1/entities/{device}/commands", {"type": "StopFeedIn"}, key, token="dev-partner")
    assert theirs.status_code == 201 and "Idempotency-Replayed" not in theirs.headers, theirs.text
    assert mine.json()["id"] != theirs.json()["id"]
    assert api.wait_terminal(theirs.json()["id"])["status"] == "Succeeded"
    assert received_ids(api, device) == [mine.json()["id"], theirs.json()["id"]]


def test_an_error_answer_is_not_kept_and_a_malformed_key_is_refused(api: Api, devices: Iterator[str]) -> None:
    device, key = next(devices), str(uuid.uuid4())
    unsupported = post(api, f"/v1/entities/{device}/commands", {"type": "StartCharging"}, key)  # a PV: not supported
    assert (unsupported.status_code, unsupported.json()["key"]) == (400, "command_not_supported")
    # Nothing was created, so the key is free: the corrected request is answered anew.
    corrected = post(api, f"/v1/entities/{device}/commands", {"type": "StopFeedIn"}, key)
    assert corrected.status_code == 201 and "Idempotency-Replayed" not in corrected.headers, corrected.text
    assert api.wait_terminal(corrected.json()["id"])["status"] == "Succeeded"
    for bad in ["", '""', "x" * 256, "caf\u00e9"]:
        refused = api.http.post(f"/v1/entities/{device}/commands", json={"type": "StopFeedIn"},
                                headers={"Authorization": "Bearer dev-contributor", "Idempotency-Key": bad.encode("latin-1")})
        assert (refused.status_code, refused.json()["key"]) == (400, "invalid_idempotency_key"), bad
    assert post(api, f"/v1/entities/{device}/commands", {"type": "StopFeedIn"}, "x" * 255).status_code == 201


def test_the_document_describes_the_header_and_its_answers(api: Api) -> None:
    document = api.http.get("/openapi.json").json()
    for path in ("/v1/entities/{entityId}/commands", "/v1/entities/{entityId}/commands/schedule", "/v1/command/"):
        operation = document["paths"][path]["post"]
        (header,) = [p for p in operation["parameters"] if p["in"] == "header"]
        assert (header["name"], header["required"], header["schema"]["maxLength"]) == ("Idempotency-Key", False, 255)
        assert "idempotency_key_reused" in operation["responses"]["422"]["description"]
        assert "idempotency_key_in_use" in operation["responses"]["409"]["description"]
        assert "Idempotency-Replayed" in operation["responses"]["201"]["headers"]
    assert "422" not in document["paths"]["/v1/commands/{id}"]["delete"]["responses"]
