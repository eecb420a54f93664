"""The rules the OCPP gateway, dispatch's ocpp backend and the simulated charge points share,
and how the backend reads the gateway's answers."""

from __future__ import annotations

import httpx
import pytest

from dercmd.dispatch import backends
from dercmd.dispatch.backends.ocpp import _answer, _outcome
from dercmd.events import CommandType
from dercmd.protocols.ocpp import MAX_ID_TAG, MAX_MESSAGE_ID, id_tag, new_message_id, parse_profiles, profiles_of
from dercmd.state.ocpp import CommandState


def test_an_id_tag_fits_ocpp_and_names_its_command() -> None:
    tags = {id_tag(f"command-{i}") for i in range(1000)}
    assert len(tags) == 1000 and all(len(t) <= MAX_ID_TAG for t in tags)
    assert id_tag("c-1") == id_tag("c-1")


def test_every_message_id_is_new_and_fits_ocpp() -> None:
    """Issue 20: the message id was the command id, so a retry reused it; now each call has its own."""
    ids = {new_message_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) <= MAX_MESSAGE_ID for i in ids)


def test_declared_types_become_feature_profiles() -> None:
    assert profiles_of([CommandType.START_CHARGING, CommandType.STOP_CHARGING]) == ["Core"]
    assert profiles_of([]) == []
    assert profiles_of(None) == ["Core"]
    assert parse_profiles(" Core, SmartCharging,,") == {"Core", "SmartCharging"}


@pytest.mark.parametrize(("status", "body", "outcome", "reason"), [
    (200, {"status": "Accepted"}, backends.Accepted, None),
    (200, {"status": "Rejected"}, backends.Refused, "rejected"),
    (404, {"key": "not_connected"}, backends.NotDelivered, "not_connected"),
    (409, {"key": "no_transaction"}, backends.Refused, "no_transaction"),
    (422, {"key": "command_not_supported"}, backends.Refused, "command_not_supported"),
    (503, {"key": "call_error", "retryAfterS": 2}, backends.NotDelivered, "call_error"),
    (502, {"key": "call_error"}, backends.Refused, "call_error"),
    (504, {"key": "no_answer"}, backends.DeliveryUnknown, "delivery_unknown"),
    (500, {"detail": "boom"}, backends.DeliveryUnknown, "delivery_unknown"),
])
def test_the_gateways_answer_is_one_of_the_outcomes(status: int, body: dict[str, object], outcome: type, reason: str | None) -> None:
    answer = _answer(httpx.Response(status, json=body), "dc0123")
    assert isinstance(answer, outcome)
    if reason is not None:
        assert isinstance(answer, backends.BackendError) and answer.reason == reason
    if status == 503:
        assert isinstance(answer, backends.NotDelivered) and answer.retry_after_s == 2


def test_a_call_sent_and_never_answered_is_never_unknown() -> None:
    """UNKNOWN lets dispatch send it again: only for what provably did not reach the charge point."""
    assert _outcome(CommandState.SENDING).finding is backends.Finding.PENDING
    assert _outcome(CommandState.ACCEPTED).finding is backends.Finding.PENDING
    assert _outcome(CommandState.SUCCEEDED).finding is backends.Finding.SUCCEEDED
    assert _outcome(CommandState.REJECTED).finding is backends.Finding.FAILED
    assert {_outcome(s).finding for s in (CommandState.UNSENT, CommandState.CALL_ERROR, None)} == {backends.Finding.UNKNOWN}


def test_neither_the_gateway_nor_the_simulator_turns_the_ocpp_packages_schema_validation_off() -> None:
    """The ocpp package checks every payload it sends and receives against the OCPP 1.6 JSON
    schemas unless a handler or a call says ``skip_schema_validation``."""
    from pathlib import Path

    root = Path(__file__).parents[2]
    sources = [p for d in ("services", "libs") for p in (root / d).rglob("*.py") if ".venv" not in p.parts]
    assert sources
    assert [str(p) for p in sources if "skip_schema_validation" in p.read_text()] == []
