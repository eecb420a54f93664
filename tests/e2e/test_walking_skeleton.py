"""A command from REST and from Kafka to a simulated device and back, through every service
running as its own process on a real broker, Redis and database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from dercmd.kafka import DLQ_ERROR, header
from dercmd.launcher import SERVICES, Stack

from ..conftest import wait_for
from .conftest import Api, Kafka

pytestmark = pytest.mark.e2e

LIFECYCLE = ["Pending", "Triggered", "Sent", "Succeeded"]


def ce(event_id: str) -> list[tuple[str, bytes]]:
    return [("ce_specversion", b"1.0"), ("ce_id", event_id.encode()), ("ce_type", b"dercmd.command.request.v1"),
            ("ce_source", b"/tests"), ("content-type", b"application/json")]


def test_rest_command_reaches_the_device_once_and_succeeds(api: Api, kafka: Kafka) -> None:
    created = api.post("ev-1", {"type": "StartCharging"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "Pending" and body["entityId"] == "ev-1" and body["type"] == "StartCharging"
    assert {"id", "triggerTime"} <= body.keys()
    assert created.headers["Location"] == f"/v1/commands/{body['id']}"

    final = api.wait_terminal(body["id"])
    assert final["status"] == "Succeeded", final
    assert [(c["commandId"], c["type"]) for c in api.received("ev-1")] == [(body["id"], "StartCharging")]
    assert kafka.statuses(body["id"], until="Succeeded") == LIFECYCLE

    accepted = datetime.fromisoformat(final["acceptedAt"])
    print(f"\naccept -> Succeeded: {(datetime.fromisoformat(final['confirmedAt']) - accepted).total_seconds() * 1000:.0f} ms "
          f"(Triggered +{(datetime.fromisoformat(final['triggeredAt']) - accepted).total_seconds() * 1000:.0f} ms, "
          f"Sent +{(datetime.fromisoformat(final['sentAt']) - accepted).total_seconds() * 1000:.0f} ms)")


def test_kafka_request_reaches_the_device_once_and_succeeds(api: Api, kafka: Kafka) -> None:
    command_id = f"kafka-{uuid.uuid4()}"
    request = {"id": command_id, "entityId": "ev-2", "type": "StopCharging"}
    kafka.produce("dercmd.commands.requests", [(b"ev-2", json.dumps(request).encode(), ce(str(uuid.uuid4())))])

    final = api.wait_terminal(command_id)
    assert final["status"] == "Succeeded" and final["source"] == "kafka", final
    assert [(c["commandId"], c["type"]) for c in api.received("ev-2")] == [(command_id, "StopCharging")]
    assert kafka.statuses(command_id, until="Succeeded") == LIFECYCLE


def test_a_kafka_request_without_id_takes_its_cloudevents_id(api: Api, kafka: Kafka) -> None:
    ce_id = f"ce-{uuid.uuid4()}"
    kafka.produce("dercmd.commands.requests", [(b"cp-2", b'{"entityId": "cp-2", "type": "StartCharging"}', ce(ce_id))])
    assert api.wait_terminal(ce_id)["status"] == "Succeeded"
    assert [c["commandId"] for c in api.received("cp-2")] == [ce_id]


def test_cooldown_refuses_a_second_command_unless_told_to_ignore_it(api: Api) -> None:
    first = api.post("pv-3", {"type": "StopFeedIn"}).json()
    assert api.wait_terminal(first["id"])["status"] == "Succeeded"

    refused = api.post("pv-3", {"type": "Reset"})
    assert refused.status_code == 409, refused.text
    assert refused.json()["key"] == "cooldown_active"
    until = datetime.fromisoformat(refused.json()["cooldownUntil"])
    assert timedelta(minutes=9) < until - datetime.now(UTC) <= timedelta(minutes=10)
    assert 540 <= int(refused.headers["Retry-After"]) <= 600

    forced = api.post("pv-3", {"type": "Reset"}, ignoreCooldown="true")
    assert forced.status_code == 201, forced.text
    final = api.wait_terminal(forced.json()["id"])
    assert final["status"] == "Succeeded" and final["ignoreCooldown"] is True
    assert [c["type"] for c in api.received("pv-3")] == ["StopFeedIn", "Reset"]


def test_unsupported_commands_are_refused_and_never_sent(api: Api) -> None:
    refused = api.post("pv-1", {"type": "Disconnect"})  # pv-1 is a Huawei inverter
    assert refused.status_code == 400 and refused.json()["key"] == "command_not_supported", refused.text
    for body in ({"type": "LimitFeedIn"}, {"type": "LimitFeedIn", "value": -1}, {"type": "LimitFeedIn", "value": 2**63},
                 {"type": "Reset", "value": 1}, {"type": "Explode"}):
        invalid = api.post("pv-1", body)
        assert invalid.status_code == 400 and invalid.json()["key"] == "validation_error", (body, invalid.text)

    # What pv-1 does support goes through, with its value; the refused ones never reach it.
    limited = api.post("pv-1", {"type": "LimitFeedIn", "value": 3000}).json()
    assert api.wait_terminal(limited["id"])["status"] == "Succeeded"
    assert [(c["type"], c["value"]) for c in api.received("pv-1")] == [("LimitFeedIn", 3000)]


def test_tokens_and_per_entity_permissions(api: Api) -> None:
    start = {"type": "StartCharging"}
    assert api.post("ev-3", start, token=None).status_code == 401
    assert api.post("ev-3", start, token="not-a-token").json()["key"] == "unauthorized"
    forbidden = api.post("ev-3", start, token="dev-viewer")
    assert forbidden.status_code == 403 and forbidden.json()["key"] == "forbidden"

    hidden = api.post("pv-2", start, token="dev-partner")  # exists, but not for this token
    missing = api.post("ev-999", start, token="dev-partner")  # does not exist
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["key"] == missing.json()["key"] == "entity_not_found"

    command = api.post("ev-3", start).json()
    assert api.get(command["id"], token="dev-viewer").status_code == 200
    assert api.get(command["id"], token="dev-partner").status_code == 200  # ev-* is the partner's
    pv_command = api.post("cp-1", {"type": "StartCharging"}).json()
    assert api.get(pv_command["id"], token="dev-partner").status_code == 404
    assert api.get(str(uuid.uuid4())).status_code == 404


def test_malformed_kafka_events_are_dead_lettered_and_the_next_good_one_succeeds(api: Api, kafka: Kafka) -> None:
    bad_id, unsupported_id, good_id = (f"{name}-{uuid.uuid4()}" for name in ("bad", "unsupported", "good"))
    key = b"pv-4"  # these in one partition, in this order
    kafka.produce(
        "dercmd.commands.requests",
        [
            (key, b"\x00 not json at all", ce(str(uuid.uuid4()))),
            (key, json.dumps({"id": bad_id, "entityId": "pv-4", "type": "LimitFeedIn"}).encode(), ce(bad_id)),
            (b"pv-1", json.dumps({"id": unsupported_id, "entityId": "pv-1", "type": "Disconnect"}).encode(), ce(unsupported_id)),
            (key, json.dumps({"id": good_id, "entityId": "pv-4", "type": "LimitFeedIn", "value": 0}).encode(), ce(good_id)),
            # the same request again (a producer retry): one command, delivered once
            (key, json.dumps({"id": good_id, "entityId": "pv-4", "type": "LimitFeedIn", "value": 0}).encode(), ce(good_id)),
        ],
    )
    assert api.wait_terminal(good_id)["status"] == "Succeeded"
    # the same id for something else, later: refused, and the first command is untouched
    kafka.produce("dercmd.commands.requests",
                  [(b"pv-1", json.dumps({"id": good_id, "entityId": "pv-1", "type": "StopFeedIn"}).encode(), ce(good_id))])

    rejected = api.wait_terminal(bad_id)
    assert rejected["status"] == "Rejected" and rejected["reason"] == "invalid_request", rejected
    unsupported = api.wait_terminal(unsupported_id)
    assert unsupported["status"] == "Rejected" and unsupported["reason"] == "command_not_supported"
    assert kafka.statuses(bad_id, until="Rejected") == ["Rejected"]

    dead = kafka.read_until("dercmd.commands.requests.dlq", lambda rs: len(rs) >= 4)
    errors = {r.value: header(r.headers, DLQ_ERROR) or "" for r in dead}  # two partitions: in no set order
    assert "json" in errors[b"\x00 not json at all"].lower(), errors
    assert sum("LimitFeedIn requires an integer value" in e for e in errors.values()) == 1, errors
    assert sum(e.startswith("command_not_supported") for e in errors.values()) == 1, errors
    assert sum(e.startswith("duplicate_id") for e in errors.values()) == 1, errors
    assert api.get(good_id).json()["entityId"] == "pv-4"
    assert [(c["commandId"], c["value"]) for c in api.received("pv-4")] == [(good_id, 0)]
    assert good_id not in {c["commandId"] for c in api.received("pv-1")}


def test_a_request_whose_key_is_not_its_entity_is_rejected_and_the_good_one_beside_it_succeeds(api: Api, kafka: Kafka) -> None:
    stray, good = f"stray-{uuid.uuid4()}", f"good-{uuid.uuid4()}"
    kafka.produce("dercmd.commands.requests", [
        (b"ev-1", json.dumps({"id": stray, "entityId": "ev-2", "type": "StartCharging"}).encode(), ce(stray)),
        (b"ev-1", json.dumps({"id": good, "entityId": "ev-1", "type": "StopCharging", "ignoreCooldown": True}).encode(), ce(good)),
    ])
    assert api.wait_terminal(good)["status"] == "Succeeded"
    rejected = api.wait_terminal(stray)
    assert (rejected["status"], rejected["reason"]) == ("Rejected", "key_mismatch"), rejected
    dead = kafka.read_until("dercmd.commands.requests.dlq", lambda rs: any(stray.encode() in (r.value or b"") for r in rs))
    assert any((header(r.headers, DLQ_ERROR) or "").startswith("key_mismatch") for r in dead if stray.encode() in (r.value or b""))
    assert stray not in {c["commandId"] for c in api.received("ev-2")}


def metric(stack: Stack, service: str, sample: str) -> float:
    for line in httpx.get(f"{stack.url(service)}/metrics", timeout=5).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_redelivered_events_change_nothing_and_reach_no_device_twice(api: Api, kafka: Kafka, stack: Stack) -> None:
    command = api.post("ev-5", {"type": "StartCharging"}).json()
    assert api.wait_terminal(command["id"])["status"] == "Succeeded"
    redelivered_before = (metric(stack, "arbitration", "dercmd_arbitration_redelivered_total"),
                          metric(stack, "dispatch", 'dercmd_dispatch_orders_total{result="redelivered"}'))

    # What a crash before the offset commit would cause: the same records once more.
    def mine(topic: str) -> list:  # type: ignore[type-arg]
        records = kafka.read_until(topic, lambda rs: any(command["id"].encode() in r.value for r in rs))
        return [(r.key, r.value, list(r.headers)) for r in records if command["id"].encode() in r.value]

    kafka.produce("dercmd.commands.accepted", mine("dercmd.commands.accepted"))
    kafka.produce("dercmd.dispatch.orders", mine("dercmd.dispatch.orders"))
    wait_for(lambda: metric(stack, "arbitration", "dercmd_arbitration_redelivered_total") > redelivered_before[0]
             and metric(stack, "dispatch", 'dercmd_dispatch_orders_total{result="redelivered"}') >= redelivered_before[1] + 2,
             what="both redeliveries to be handled")

    assert [c["commandId"] for c in api.received("ev-5")].count(command["id"]) == 1
    final = api.get(command["id"]).json()
    assert final["status"] == "Succeeded"


def test_an_entitys_commands_are_listed_newest_first_a_page_at_a_time(api: Api) -> None:
    first = api.post("cp-1", {"type": "StartCharging"}, ignoreCooldown="true").json()
    second = api.post("cp-1", {"type": "StopCharging"}, ignoreCooldown="true").json()
    # The first ends Canceled if the second superseded it before dispatch claimed it, else as
    # the charge point answered; whatever each ended as, the listing shows both.
    first_status = api.wait_terminal(first["id"])["status"]
    api.wait_terminal(second["id"])
    headers = {"Authorization": "Bearer dev-viewer"}
    page = api.http.get("/v1/entities/cp-1/commands", params={"pageSize": 1}, headers=headers).json()
    assert [c["id"] for c in page["items"]] == [second["id"]] and page["hasMore"] is True
    listed = api.http.get("/v1/entities/cp-1/commands", params={"from": first["createdAt"]}, headers=headers).json()
    assert [c["id"] for c in listed["items"]] == [second["id"], first["id"]]
    by_status = api.http.get("/v1/entities/cp-1/commands", params={"status": first_status, "from": first["createdAt"]}, headers=headers).json()
    assert first["id"] in {c["id"] for c in by_status["items"]}
    hidden = api.http.get("/v1/entities/cp-1/commands", headers={"Authorization": "Bearer dev-partner"})
    assert hidden.status_code == 404
    naive = api.http.get("/v1/entities/cp-1/commands", params={"from": "2026-01-01T00:00:00"}, headers=headers)
    assert naive.status_code == 400 and naive.json()["key"] == "validation_error"


def test_forged_backend_results_are_refused(api: Api, stack: Stack) -> None:
    command = api.post("ev-5", {"type": "StopCharging"}, ignoreCooldown="true").json()
    final = api.wait_terminal(command["id"])
    url = f"{stack.url('dispatch')}/callbacks/vendor-cloud"
    forged = {"requestId": "x", "commandId": command["id"], "deviceId": "ev-5", "result": "FAILED", "message": "forged"}
    for token in ("", "ev-5", f"{'0' * 32}:ev-5", f"{'0' * 32}:"):
        response = httpx.post(url, json={"results": [{**forged, "responseToken": token}]}, timeout=5)
        assert response.status_code == 403 and response.json()["key"] == "invalid_signature", (token, response.text)
    assert api.get(command["id"]).json() == final


def test_every_service_has_health_and_prometheus_metrics(stack: Stack) -> None:
    for service in SERVICES:
        health = httpx.get(f"{stack.url(service)}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok", (service, health.text)
        metrics = httpx.get(f"{stack.url(service)}/metrics", timeout=5)
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert "dercmd_" in metrics.text, service
    status_metrics = httpx.get(f"{stack.url('status')}/metrics").text
    assert 'dercmd_status_events_total{status="Succeeded"}' in status_metrics
