"""The vendor-cloud client against a scripted vendor (httpx.MockTransport): what it sends, and
how it turns each answer into per-item results or a VendorCloudError."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import ValidationError

from dercmd.protocols.vendor_cloud import (
    VendorBatch,
    VendorCloudClient,
    VendorCloudError,
    VendorCommand,
    VendorResults,
    parse_retry_after,
)

RESPONSE_URL = "http://dispatch.test/callbacks/vendor-cloud"
COMMANDS = [
    VendorCommand(device_id="ev-1", command_id="c1", type="StartCharging", response_token="t1"),
    VendorCommand(device_id="nope", command_id="c2", type="StopCharging", response_token="t2"),
    VendorCommand(device_id="pv-1", command_id="c3", type="LimitFeedIn", value=3000, response_token="t3"),
]


def client(handler) -> VendorCloudClient:  # type: ignore[no-untyped-def]
    return VendorCloudClient("http://vendor.test/vendor-cloud/", "secret", timeout_s=1.0, transport=httpx.MockTransport(handler))


async def test_a_batch_is_one_post_and_answers_per_item_in_order() -> None:
    seen: list[httpx.Request] = []

    def vendor(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"results": [
            {"commandId": "c1", "status": 202, "requestId": "r1"},
            {"commandId": "c2", "status": 404, "message": "unknown device nope"},
            {"commandId": "c3", "status": 409, "message": "device busy"},
        ]})

    vendor_cloud = client(vendor)
    results = await vendor_cloud.send_commands(RESPONSE_URL, COMMANDS)
    await vendor_cloud.aclose()

    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "http://vendor.test/vendor-cloud/v1/commands:batch"
    assert request.headers["Authorization"] == "Bearer secret"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"responseUrl": RESPONSE_URL, "commands": [
        {"deviceId": "ev-1", "commandId": "c1", "type": "StartCharging", "responseToken": "t1"},
        {"deviceId": "nope", "commandId": "c2", "type": "StopCharging", "responseToken": "t2"},
        {"deviceId": "pv-1", "commandId": "c3", "type": "LimitFeedIn", "value": 3000, "responseToken": "t3"},
    ]}
    assert [(r.command_id, r.status, r.accepted, r.request_id) for r in results] == [
        ("c1", 202, True, "r1"), ("c2", 404, False, None), ("c3", 409, False, None)
    ]
    assert results[1].message == "unknown device nope" and not results[1].retriable


async def test_an_answer_that_does_not_match_the_batch_is_an_error() -> None:
    vendor_cloud = client(lambda request: httpx.Response(200, json={"results": [{"commandId": "c1", "status": 202}]}))
    with pytest.raises(VendorCloudError) as caught:
        await vendor_cloud.send_commands(RESPONSE_URL, COMMANDS)
    assert caught.value.status == 200 and not caught.value.retriable and caught.value.unknown


@pytest.mark.parametrize(
    ("response", "retriable", "retry_after_s"),
    [
        (httpx.Response(401, json={"message": "invalid token"}), False, None),
        (httpx.Response(400, json={"message": "malformed batch"}), False, None),
        (httpx.Response(429, headers={"Retry-After": "7"}), True, 7.0),
        (httpx.Response(503, text="maintenance"), True, None),
    ],
    ids=["401", "400", "429", "503"],
)
async def test_whole_request_failures(response: httpx.Response, retriable: bool, retry_after_s: float | None) -> None:
    vendor_cloud = client(lambda request: response)
    with pytest.raises(VendorCloudError) as caught:
        await vendor_cloud.send_commands(RESPONSE_URL, COMMANDS)
    assert (caught.value.status, caught.value.retriable, caught.value.retry_after_s) == (response.status_code, retriable, retry_after_s)


@pytest.mark.parametrize(
    "error", [httpx.ReadTimeout("no answer"), httpx.RemoteProtocolError("server disconnected")], ids=["read timeout", "dropped"]
)
async def test_no_answer_after_sending_is_an_unknown_delivery_never_a_retriable_one(error: httpx.TransportError) -> None:
    def vendor(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(VendorCloudError) as caught:
        await client(vendor).send_commands(RESPONSE_URL, COMMANDS)
    assert caught.value.unknown and not caught.value.retriable and caught.value.status is None


@pytest.mark.parametrize("status", [502, 504])
async def test_a_gateway_that_gave_up_is_an_unknown_delivery(status: int) -> None:
    with pytest.raises(VendorCloudError) as caught:
        await client(lambda request: httpx.Response(status)).send_commands(RESPONSE_URL, COMMANDS)
    assert caught.value.unknown


async def test_a_connection_failure_is_retriable() -> None:
    def vendor(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(VendorCloudError) as caught:
        await client(vendor).send_commands(RESPONSE_URL, COMMANDS)
    assert caught.value.retriable and not caught.value.unknown and caught.value.status is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_results_read_as_the_vendor_posts_them() -> None:
    body = {"results": [{"requestId": "r1", "commandId": "c1", "deviceId": "ev-1", "result": "FAILED",
                         "message": "unplugged", "responseToken": "t1"}]}
    [result] = VendorResults.model_validate(body).results
    assert (result.request_id, result.result, result.message, result.response_token) == ("r1", "FAILED", "unplugged", "t1")


def test_a_batch_holds_1_to_1000_commands() -> None:
    with pytest.raises(ValidationError):
        VendorBatch(response_url=RESPONSE_URL, commands=[])
    with pytest.raises(ValidationError):
        VendorBatch(response_url=RESPONSE_URL, commands=COMMANDS[:1] * 1001)
