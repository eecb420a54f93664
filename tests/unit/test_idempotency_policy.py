"""The Idempotency-Key policy's pure parts (dercmd.intake.idempotency): what a key may be, what
makes two requests the same, whose keys they are."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from dercmd.intake.admission import Refusal
from dercmd.intake.idempotency import checked_key, fingerprint, scope_of


def test_a_key_is_1_to_255_printable_ascii_characters_plain_or_quoted() -> None:
    assert checked_key("8e03978e-40d5-43e8-bc93-6894a57f9324") == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert checked_key('"8e03978e"') == "8e03978e"  # the draft's structured-field string
    assert checked_key("x" * 255) == "x" * 255 and checked_key('"') == '"'
    for bad in ("", '""', "x" * 256, "caf\u00e9", "a\tb"):
        with pytest.raises(Refusal) as refused:
            checked_key(bad)
        assert (refused.value.key, refused.value.status) == ("invalid_idempotency_key", 400)


def request(body: bytes, path: str = "/v1/entities/pv-1/commands", query: bytes = b"", method: str = "POST") -> Request:
    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": method, "path": path, "query_string": query, "headers": []}, receive)


async def test_two_requests_are_the_same_when_method_path_query_and_body_as_json_are() -> None:
    same = await fingerprint(request(b'{"type": "LimitFeedIn", "value": 3000}'))
    assert await fingerprint(request(b'{ "value":3000,"type":"LimitFeedIn"}')) == same
    for other in (request(b'{"type": "LimitFeedIn", "value": 3001}'), request(b'{"type": "LimitFeedIn", "value": 3000}', path="/v1/x"),
                  request(b'{"type": "LimitFeedIn", "value": 3000}', query=b"ignoreCooldown=true"),
                  request(b'{"type": "LimitFeedIn", "value": "3000"}')):
        assert await fingerprint(other) != same


def test_scopes_are_hashes_of_the_token() -> None:
    assert scope_of("dev-contributor") != scope_of("dev-partner")
    assert "dev-contributor" not in scope_of("dev-contributor") and len(scope_of("x")) == 32
