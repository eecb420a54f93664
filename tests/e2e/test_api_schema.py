"""Input hardening against the running stack (every service a process, a real broker, Redis
and ledger): schemathesis sends what the OpenAPI document allows, and what it does not, and
every answer must be no server error and exactly as the document describes; bad requests get
the one error envelope with a stable key on every service; Kafka requests are as strict as
REST, and one command id's fate does not depend on the order requests are read in."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode, checks

from dercmd.kafka import DLQ_ERROR, header
from dercmd.launcher import Stack

from ..conftest import wait_for
from .conftest import Api, Kafka, running_stack

pytestmark = pytest.mark.e2e

#: Response conformance (status code, content type, headers, body schema), no server error,
#: and negative data (what the document does not allow) refused with a 4xx.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection]
#: Per operation and generation mode; schemathesis stops sooner where the schema allows fewer
#: distinct requests. About 25 s for all 1,200 on the 2-core machine.
MAX_EXAMPLES = 100
#: Real targets, so requests get past "no such entity" to validation, compatibility,
#: cooldowns, cancels (generated ids alone would nearly all be 404).
ENTITIES = ["ev-1", "cp-1", "pv-1", "pv-2", "dev-1"]
H = {"Authorization": "Bearer dev-contributor"}


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(request, tmp_path_factory)


def test_every_request_is_answered_as_the_schema_documents(stack: Stack) -> None:
    url = stack.url("intake")
    known = [httpx.post(f"{url}/v1/entities/{e}/commands", json=body, headers=H, params={"ignoreCooldown": "true"},
                        timeout=10).json()["id"]
             for e, body in [("ev-1", {"type": "StartCharging"}), ("pv-1", {"type": "LimitFeedIn", "value": 3000})]]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # still open: a DELETE of it is 202
    known += [httpx.post(f"{url}/v1/entities/cp-1/commands/schedule", json=[{"triggerTime": later, "type": "StopCharging"}],
                         headers=H, timeout=10).json()["commands"][0]["id"]]
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    examples, statuses = Counter[str](), Counter[int]()
    server_errors: list[str] = []
    mismatches: list[str] = []
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        names = {p.name for p in operation.path_parameters}
        targets = [{"entityId": e} for e in ENTITIES] if "entityId" in names else [{"id": i} for i in known] if "id" in names else []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = st.one_of(operation.as_strategy(mode), *(operation.as_strategy(mode, path_parameters=t) for t in targets))
            run = f"{label} ({mode.value})"

            @given(case=strategy)
            @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def answered_as_documented(case: schemathesis.Case) -> None:
                examples[run] += 1
                response = case.call(headers=H)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{run}: {response.status_code} {response.text[:300]}")
                case.validate_response(response, checks=CHECKS, headers=H)

            try:
                answered_as_documented()
            except Exception as exc:  # schemathesis's failures (hypothesis's smallest example): all reported at the end
                mismatches.append(f"{run}: {str(exc)[:1500]}")
    print(f"\nschemathesis: {len(operations)} operations, {sum(examples.values()):,} requests, {len(server_errors)} server "
          f"errors, {len(mismatches)} mismatches; statuses {dict(sorted(statuses.items()))}; {dict(examples)}")
    assert len(operations) == 6, [f"{o.method.upper()} {o.path}" for o in operations]
    assert statuses[201] and statuses[200] and statuses[202] and statuses[400] and statuses[409], statuses
    assert server_errors == [], server_errors
    assert mismatches == [], "\n\n".join(mismatches[:10])


@pytest.mark.parametrize(("method", "path", "body", "status", "key"), [
    ("GET", "/v1/entities/ev-1/commands?page=4611686018427387904", None, 400, "validation_error"),
    ("GET", "/v1/entities/ev-1/commands?pageSize=4611686018427387904", None, 400, "validation_error"),
    ("GET", "/v1/entities/ev-1/commands?page=0", None, 400, "validation_error"),
    ("GET", "/v1/entities/ev-1/commands?from=1700000000", None, 400, "validation_error"),
    ("POST", "/v1/entities/ev-1/commands", b"\xff\xfe", 400, "invalid_json"),
    ("POST", "/v1/entities/ev-1/commands", b"{\"type\": ", 400, "invalid_json"),
    ("POST", "/v1/entities/ev-1/commands", b"[" * 5000 + b"]" * 5000, 400, "invalid_json"),
    ("POST", "/v1/entities/ev-1/commands", b"{\"a\":" * 5000 + b"1" + b"}" * 5000, 400, "invalid_json"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "LimitFeedIn", "value": "3.5"}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "LimitFeedIn", "value": "abc"}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "LimitFeedIn", "value": "-1"}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "LimitFeedIn", "value": "2147483648"}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "LimitFeedIn", "value": true}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "LimitFeedIn", "value": 3000.0}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "Reset", "value": 0}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands", b'{"type": "Reset", "expiresAt": 1893456000}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands?ignoreCooldown=1", b'{"type": "Reset"}', 400, "validation_error"),
    ("POST", "/v1/entities/pv-1/commands?ignorecooldown=true", b'{"type": "Reset"}', 400, "validation_error"),
    ("POST", "/v1/command/", b'{"command": {"type": "limitProductionPower", "percentage": "30", "startAt": "2030-01-01T00:00:00Z",'
                             b' "endAt": "2030-01-01T01:00:00Z"}, "deviceHashIds": ["dev-1"]}', 400, "validation_error"),
    ("GET", "/no/such/route", None, 404, "not_found"),
    ("PUT", "/v1/commands/x", None, 405, "method_not_allowed"),
    ("HEAD", "/v1/entities/ev-1/commands/schedule", None, 405, "method_not_allowed"),
])
def test_bad_requests_get_the_error_envelope_with_a_stable_key(stack: Stack, method: str, path: str, body: bytes | None,
                                                              status: int, key: str) -> None:
    response = httpx.request(method, f"{stack.url('intake')}{path}", content=body,
                             headers={**H, "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == status, response.text
    if method != "HEAD":
        assert response.json()["key"] == key and isinstance(response.json()["message"], str), response.text


def test_the_schema_says_which_types_take_a_value_and_every_route_names_its_methods(stack: Stack) -> None:
    document = httpx.get(f"{stack.url('intake')}/openapi.json", timeout=10).json()
    body = document["paths"]["/v1/entities/{entityId}/commands"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    mapping = body["discriminator"]["mapping"]
    schemas = document["components"]["schemas"]
    plain = schemas[mapping["Reset"].rsplit("/", 1)[1]]
    assert plain["additionalProperties"] is False and set(plain["properties"]) == {"type", "expiresAt"}
    valued = schemas[mapping["LimitFeedIn"].rsplit("/", 1)[1]]
    # The Commands API's documented form too: an integer, or a string of decimal digits.
    assert valued["properties"]["value"]["anyOf"] == [{"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                                                      {"type": "string", "pattern": "^[0-9]{1,10}$"}]
    assert "value" in valued["required"]
    # FastAPI's 422 is documented as the envelope's 400; the one 422 is a POST's reused Idempotency-Key.
    assert all("422" not in op["responses"] or (method == "post" and "idempotency_key_reused" in op["responses"]["422"]["description"])
               for ops in document["paths"].values() for method, op in ops.items())
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, allow in [("/v1/commands/x", "DELETE, GET, OPTIONS"), ("/v1/entities/ev-1/commands", "GET, OPTIONS, POST"),
                        ("/v1/entities/ev-1/commands/schedule", "OPTIONS, POST"), ("/v1/command/", "OPTIONS, POST"),
                        ("/health", "GET, OPTIONS")]:
        options = httpx.options(f"{stack.url('intake')}{path}", timeout=10)
        assert (options.status_code, options.headers["Allow"]) == (204, allow), path
        wrong = httpx.patch(f"{stack.url('intake')}{path}", headers=H, timeout=10)
        assert (wrong.status_code, wrong.headers["Allow"], wrong.json()["key"]) == (405, allow, "method_not_allowed"), path


@pytest.mark.parametrize("service", ["dispatch", "ocpp_gateway", "status", "arbitration", "simulator"])
def test_every_service_answers_errors_in_the_envelope(stack: Stack, service: str) -> None:
    url = stack.url(service)
    missing = httpx.get(f"{url}/no/such/route", timeout=10)
    assert (missing.status_code, missing.json()["key"]) == (404, "not_found")
    wrong = httpx.delete(f"{url}/health", timeout=10)
    assert (wrong.status_code, wrong.json()["key"], wrong.headers["Allow"]) == (405, "method_not_allowed", "GET, OPTIONS")


@pytest.mark.parametrize(("path", "body", "status", "key"), [
    ("/callbacks/vendor-cloud", b"not json", 400, "invalid_result"),
    ("/callbacks/vendor-cloud", b"[" * 5000 + b"]" * 5000, 400, "invalid_result"),
    ("/callbacks/ocpp", b"\xff\xfe", 400, "invalid_result"),
    ("/callbacks/ev-aggregator", b"{}", 403, "invalid_signature"),
    ("/callbacks/no-such-backend", b"{}", 404, "not_found"),
])
def test_callback_errors_get_the_envelope(stack: Stack, path: str, body: bytes, status: int, key: str) -> None:
    response = httpx.post(f"{stack.url('dispatch')}{path}", content=body, timeout=10)
    assert (response.status_code, response.json()["key"]) == (status, key), response.text
    assert isinstance(response.json()["message"], str)


def ce(event_id: str) -> list[tuple[str, bytes]]:
    return [("ce_specversion", b"1.0"), ("ce_id", event_id.encode()), ("ce_type", b"dercmd.command.request.v1"),
            ("ce_source", b"/tests"), ("content-type", b"application/json")]


def request(command_id: str, entity_id: str, **fields: Any) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return entity_id.encode(), json.dumps({"id": command_id, "entityId": entity_id, **fields}).encode(), ce(command_id)


def dead_letter_errors(kafka: Kafka, ids: list[str]) -> dict[str, str]:
    """The dead letters' errors of the requests with these ids, once there is one for each."""
    def of(records: list[Any]) -> dict[str, str]:
        return {i: header(r.headers, DLQ_ERROR) or "" for r in records for i in ids if i.encode() in (r.value or b"")}

    return of(kafka.read_until("dercmd.commands.requests.dlq", lambda rs: len(of(rs)) == len(ids)))


@pytest.fixture(scope="module")
def api(stack: Stack) -> Api:
    return Api(stack)


@pytest.fixture(scope="module")
def kafka(stack: Stack) -> Kafka:
    return Kafka(stack.settings.kafka_bootstrap)


def test_kafka_requests_are_as_strict_as_rest_and_never_cost_the_good_one_beside_them(api: Api, kafka: Kafka) -> None:
    bad = {f"{name}-{uuid.uuid4()}": fields for name, fields in [
        ("string", {"type": "LimitFeedIn", "value": "3.5"}), ("bool", {"type": "LimitFeedIn", "value": True}),
        ("negative", {"type": "LimitFeedIn", "value": "-1"}),
        ("float", {"type": "LimitFeedIn", "value": 3000.0}), ("reset-value", {"type": "Reset", "value": 0}),
        ("epoch", {"type": "StopFeedIn", "startAt": 1893456000}), ("flag", {"type": "Reset", "ignoreCooldown": "true"}),
    ]}
    good = f"good-{uuid.uuid4()}"
    kafka.produce("dercmd.commands.requests", [request(i, "pv-4", **f) for i, f in bad.items()]
                  + [request(good, "pv-4", type="LimitFeedIn", value=3000, ignoreCooldown=True)])
    assert api.wait_terminal(good)["status"] == "Succeeded"
    for command_id in bad:
        assert (api.wait_terminal(command_id)["status"], api.get(command_id).json()["reason"]) == ("Rejected", "invalid_request")
    assert all(dead_letter_errors(kafka, list(bad)).values())
    assert [c["commandId"] for c in api.received("pv-4") if c["commandId"] in {good, *bad}] == [good]


def test_a_rejected_request_holds_no_id_whichever_comes_first(api: Api, kafka: Kafka) -> None:
    """An invalid request and a valid one with the same id: the valid one is the command,
    in either order; the invalid one is dead-lettered in either order."""
    first_bad, first_good = f"bad-first-{uuid.uuid4()}", f"good-first-{uuid.uuid4()}"
    kafka.produce("dercmd.commands.requests", [request(first_bad, "pv-3", type="LimitFeedIn", value="0.5")])
    assert api.wait_terminal(first_bad)["status"] == "Rejected"
    corrected = request(first_bad, "pv-3", type="LimitFeedIn", value=0, ignoreCooldown=True)
    kafka.produce("dercmd.commands.requests", [corrected])  # takes the id
    wait_for(lambda: api.get(first_bad).json()["status"] == "Succeeded", what="the corrected request to succeed")
    assert "reason" not in api.get(first_bad).json()
    kafka.produce("dercmd.commands.requests", [request(first_good, "pv-3", type="StopFeedIn", ignoreCooldown=True)])
    assert api.wait_terminal(first_good)["status"] == "Succeeded"
    marker = f"marker-{uuid.uuid4()}"  # after it in the partition: its Pending comes after any Rejected of it
    kafka.produce("dercmd.commands.requests", [request(first_good, "pv-3", type="LimitFeedIn", value="0.5"),
                                               request(marker, "pv-3", type="Reset", ignoreCooldown=True)])
    assert dead_letter_errors(kafka, [first_good])[first_good]
    statuses = kafka.read_until("dercmd.commands.status", lambda rs: any(marker.encode() in (r.value or b"") for r in rs))
    assert [json.loads(r.value)["status"] for r in statuses if json.loads(r.value)["commandId"] == first_good].count("Rejected") == 0
    assert api.get(first_good).json()["status"] == "Succeeded"  # untouched


def test_one_id_names_one_command_bound_to_its_entity_and_content(api: Api, kafka: Kafka) -> None:
    taken = f"taken-{uuid.uuid4()}"
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    kafka.produce("dercmd.commands.requests", [
        request(taken, "ev-2", type="StopCharging", ignoreCooldown=True),
        request(taken, "ev-2", type="StopCharging", ignoreCooldown=True),  # the same request again: idempotent
        request(taken, "ev-2", type="StopCharging", ignoreCooldown=True, startAt=later),  # other content: refused
    ])
    assert api.wait_terminal(taken)["status"] == "Succeeded"
    # Another entity's partition: "after" only once the first is in the ledger (Kafka orders no two partitions).
    kafka.produce("dercmd.commands.requests", [request(taken, "ev-5", type="StopCharging", ignoreCooldown=True)])
    dead = kafka.read_until("dercmd.commands.requests.dlq",
                            lambda rs: sum(taken.encode() in (r.value or b"") for r in rs) >= 2)
    errors = [header(r.headers, DLQ_ERROR) or "" for r in dead if taken.encode() in (r.value or b"")]
    assert len(errors) == 2 and all(e.startswith("duplicate_id") for e in errors), errors
    state = api.get(taken).json()
    assert (state["entityId"], state.get("startAt")) == ("ev-2", None)
    assert [c["commandId"] for c in api.received("ev-2")].count(taken) == 1
    assert taken not in {c["commandId"] for c in api.received("ev-5")}
