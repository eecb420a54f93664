"""Input hardening, the pure parts: strict request values, the REST shapes agreeing with
CommandFields, what makes two commands with one id the same command, the error envelope."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from dercmd import web
from dercmd.events import (
    PERCENTAGE_TYPES,
    VALUED_TYPES,
    CommandAcceptedV1,
    CommandRequestV1,
    CommandStateV1,
    CommandStatus,
    CommandType,
    PercentageCommand,
    PlainCommand,
    ValueCommand,
    shape_types,
)
from dercmd.intake.admission import Refusal, _what

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_the_rest_shapes_say_what_command_fields_checks() -> None:
    assert shape_types(ValueCommand) == VALUED_TYPES and shape_types(PercentageCommand) == PERCENTAGE_TYPES
    assert shape_types(PlainCommand) == frozenset(CommandType) - VALUED_TYPES - PERCENTAGE_TYPES


@pytest.mark.parametrize("fields", [
    {"type": "LimitFeedIn", "value": "3.5"}, {"type": "LimitFeedIn", "value": "abc"}, {"type": "LimitFeedIn", "value": "-1"},
    {"type": "LimitFeedIn", "value": " 3000"}, {"type": "LimitFeedIn", "value": "2147483648"}, {"type": "LimitFeedIn", "value": ""},
    {"type": "LimitFeedIn", "value": True}, {"type": "LimitFeedIn", "value": 3000.0},
    {"type": "Reset", "value": 0}, {"type": "Reset", "ignoreCooldown": "true"}, {"type": "Reset", "ignoreCooldown": 1},
    {"type": "StopFeedIn", "startAt": 1893456000}, {"type": "StopFeedIn", "startAt": "1893456000"},
    {"type": "Reset", "expiresAt": True}, {"type": "Reset", "expiresAt": "0001-01-01T00:00:00+01:00"},
])
def test_kafka_requests_are_strict(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CommandRequestV1.model_validate_json(json.dumps({"entityId": "pv-1", **fields}))


@pytest.mark.parametrize("extra", [{"entityId": "pv-1"}, {}], ids=["kafka", "rest"])
def test_value_is_taken_as_the_commands_api_documents_it_a_string_of_digits(extra: dict[str, str]) -> None:
    """The Commands API documents ``value`` as a string: ``"3000"`` is 3000, on Kafka and REST."""
    shape = CommandRequestV1 if extra else ValueCommand

    def parse(value: object) -> object:
        return shape.model_validate_json(json.dumps({**extra, "type": "LimitFeedIn", "value": value})).value

    for sent, read in (("3000", 3000), ("0", 0), ("03000", 3000), (3000, 3000), ("2147483647", 2**31 - 1)):
        assert parse(sent) == read and isinstance(parse(sent), int), sent
    for bad in ("3.5", "abc", "-1", "+1", "1e3", " 1", "1 ", "2147483648", "", True, 1.5, -1, 2**31, None):
        with pytest.raises(ValidationError):
            parse(bad)


def test_a_kafka_request_with_proper_values_parses() -> None:
    request = CommandRequestV1.model_validate_json(
        '{"entityId": "pv-1", "type": "LimitFeedIn", "value": 3000, "ignoreCooldown": true, "startAt": "2026-06-01T12:00:00Z"}')
    assert (request.value, request.ignore_cooldown, request.start_at) == (3000, True, T0)


def accepted(**kw: object) -> CommandAcceptedV1:
    fields: dict[str, object] = {"id": "c-1", "entity_id": "pv-1", "type": CommandType.LIMIT_FEED_IN, "value": 10,
                                 "accepted_at": T0, "source": "kafka", **kw}
    return CommandAcceptedV1(**fields)  # type: ignore[arg-type]


def test_a_redelivered_request_is_the_same_command_anything_else_is_not() -> None:
    first = accepted()
    assert _what(accepted(accepted_at=T0 + timedelta(seconds=5))) == _what(first)  # read again later
    for other in ({"entity_id": "pv-2"}, {"value": 11}, {"trigger_time": T0 + timedelta(hours=1)}, {"ignore_cooldown": True},
                  {"expires_at": T0 + timedelta(hours=1)}, {"asset_identifiers": ("a",)}):
        assert _what(accepted(**other)) != _what(first), other


def test_the_ledgers_state_of_a_command_compares_with_the_request() -> None:
    """The ledger keeps an immediate command's trigger time as its acceptance time."""
    state = CommandStateV1(id="c-1", entity_id="pv-1", status=CommandStatus.PENDING, type=CommandType.LIMIT_FEED_IN, value=10,
                           trigger_time=T0, accepted_at=T0, created_at=T0, updated_at=T0)
    assert _what(state) == _what(accepted(accepted_at=T0 + timedelta(seconds=1)))
    later = state.model_copy(update={"trigger_time": T0 + timedelta(hours=1)})
    assert _what(later) == _what(accepted(trigger_time=T0 + timedelta(hours=1)))
    assert _what(later) != _what(accepted())


def envelope_app() -> TestClient:
    app = FastAPI()
    web.install_error_envelope(app)
    seen: list[tuple[str, int]] = []
    web.observe_errors(app, lambda request, key, status: seen.append((key, status)))
    app.state.seen = seen

    @app.post("/things/{name}")
    async def post_thing(name: str, body: dict[str, int]) -> dict[str, str]:
        if name == "refused":
            raise Refusal("command_finished", "done", status=409, extra={"status": "Succeeded"})
        if name == "bug":
            raise KeyError(name)
        return {"name": name}

    @app.get("/things/{name}")
    async def get_thing(name: str) -> dict[str, str]:
        return {"name": name}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(("method", "path", "body", "status", "key"), [
    ("POST", "/things/a", b"{", 400, "invalid_json"),
    ("POST", "/things/a", b"\xff", 400, "invalid_json"),
    ("POST", "/things/a", b"[" * 5000 + b"]" * 5000, 400, "invalid_json"),
    ("POST", "/things/a", b'{"x": "one"}', 400, "validation_error"),
    ("POST", "/things/refused", b"{}", 409, "command_finished"),
    ("POST", "/things/bug", b"{}", 500, "internal_error"),
    ("GET", "/nothing", None, 404, "not_found"),
    ("DELETE", "/things/a", None, 405, "method_not_allowed"),
])
def test_every_error_is_the_envelope(method: str, path: str, body: bytes | None, status: int, key: str) -> None:
    client = envelope_app()
    response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()["key"]) == (status, key), response.text
    assert isinstance(response.json()["message"], str)
    assert client.app.state.seen == [(key, status)]  # type: ignore[attr-defined]


def test_a_refusal_keeps_its_own_fields_and_405_and_options_name_every_method() -> None:
    client = envelope_app()
    refused = client.post("/things/refused", json={})
    assert refused.json() == {"key": "command_finished", "message": "done", "status": "Succeeded"}
    assert client.delete("/things/a").headers["Allow"] == "GET, OPTIONS, POST"
    options = client.options("/things/a")
    assert (options.status_code, options.headers["Allow"]) == (204, "GET, OPTIONS, POST")


def test_the_openapi_document_says_400_not_422() -> None:
    document = envelope_app().app.openapi()  # type: ignore[attr-defined]
    responses = document["paths"]["/things/{name}"]["post"]["responses"]
    assert "422" not in responses and responses["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
