"""The EV-aggregator client against a scripted aggregator (httpx.MockTransport): the OAuth2
token it fetches, caches and renews, what an action request carries, and how each answer
becomes an action or an EvAggregatorError of the right class."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest

from dercmd.protocols.ev_aggregator import EvAggregatorClient, EvAggregatorError, refusal, sign

BASE = "http://aggregator.test/ev-aggregator/"
ACTION = {"id": "a1", "vehicleId": "WBA 1/2", "type": "START_CHARGING", "state": "PENDING", "idempotencyKey": "c1"}


class Aggregator:
    """Issues tokens ``t1``, ``t2``, ... (``expires_in`` each) and answers API calls with
    ``api(request)``; records every request."""

    def __init__(self, api: Callable[[httpx.Request], httpx.Response], expires_in: float | None = 3600) -> None:
        self.api = api
        self.expires_in = expires_in
        self.token_status = 200
        self.requests: list[httpx.Request] = []
        self.issued = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/oauth/token"):
            if self.token_status != 200:
                return httpx.Response(self.token_status, json={"error": "invalid_client"})
            self.issued += 1
            body = {"access_token": f"t{self.issued}", "token_type": "Bearer"}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return httpx.Response(200, json=body)
        return self.api(request)

    def api_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if not r.url.path.endswith("/oauth/token")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client(aggregator: Aggregator, clock: Clock | None = None) -> EvAggregatorClient:
    return EvAggregatorClient(BASE, "dercmd", "s3cret", timeout_s=1.0, transport=httpx.MockTransport(aggregator),
                              clock=clock or Clock())


async def test_an_action_is_one_post_with_the_key_after_one_form_encoded_token_request() -> None:
    aggregator = Aggregator(lambda r: httpx.Response(202, json=ACTION))
    ev = client(aggregator)
    action = await ev.create_action("WBA 1/2", "START_CHARGING", "c1")
    await ev.aclose()

    token_request, action_request = aggregator.requests
    assert str(token_request.url) == "http://aggregator.test/ev-aggregator/oauth/token"
    assert token_request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(token_request.content.decode()) == {
        "grant_type": ["client_credentials"], "client_id": ["dercmd"], "client_secret": ["s3cret"],
    }
    assert "Authorization" not in token_request.headers
    assert action_request.method == "POST"
    assert action_request.url.raw_path == b"/ev-aggregator/v1/vehicles/WBA%201%2F2/actions"
    assert action_request.headers["Authorization"] == "Bearer t1"
    assert action_request.headers["Idempotency-Key"] == "c1"
    assert action_request.headers["Content-Type"] == "application/json"
    assert json.loads(action_request.content) == {"type": "START_CHARGING"}
    assert (action.id, action.state, action.idempotency_key) == ("a1", "PENDING", "c1")


async def test_the_token_is_cached_and_renewed_shortly_before_it_expires() -> None:
    aggregator = Aggregator(lambda r: httpx.Response(202, json=ACTION), expires_in=100)
    clock = Clock()
    ev = client(aggregator, clock)
    await ev.create_action("v", "START_CHARGING", "c1")
    clock.now += 79  # renewed a fifth of its lifetime before it expires: at 80 s
    await ev.create_action("v", "START_CHARGING", "c1")
    clock.now += 1
    await ev.create_action("v", "START_CHARGING", "c1")
    await ev.aclose()

    assert [r.headers["Authorization"] for r in aggregator.api_requests()] == ["Bearer t1", "Bearer t1", "Bearer t2"]
    assert aggregator.issued == ev.tokens_fetched == 2


async def test_a_401_gets_one_new_token_and_one_more_try() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer t1":  # revoked early
            return httpx.Response(401, json={"error": "invalid_token"})
        return httpx.Response(200, json=ACTION | {"state": "CONFIRMED"})

    aggregator = Aggregator(api)
    ev = client(aggregator)
    action = await ev.action_by_key("c1")
    await ev.aclose()

    assert action is not None and action.state == "CONFIRMED"
    assert [r.headers["Authorization"] for r in aggregator.api_requests()] == ["Bearer t1", "Bearer t2"]
    assert aggregator.api_requests()[0].url.params["idempotencyKey"] == "c1"


async def test_a_second_401_is_the_answer_and_is_not_retriable() -> None:
    aggregator = Aggregator(lambda r: httpx.Response(401, json={"error": "invalid_token"}))
    ev = client(aggregator)
    with pytest.raises(EvAggregatorError) as caught:
        await ev.create_action("v", "STOP_CHARGING", "c1")
    await ev.aclose()
    assert (caught.value.status, caught.value.retriable, caught.value.unknown) == (401, False, False)
    assert aggregator.issued == 2 and len(aggregator.api_requests()) == 2


async def test_bad_credentials_fail_before_any_action_is_asked_for() -> None:
    aggregator = Aggregator(lambda r: httpx.Response(202, json=ACTION))
    aggregator.token_status = 401
    ev = client(aggregator)
    with pytest.raises(EvAggregatorError) as caught:
        await ev.create_action("v", "START_CHARGING", "c1")
    await ev.aclose()
    assert (caught.value.status, caught.value.retriable, caught.value.unknown) == (401, False, False)
    assert aggregator.api_requests() == []


async def test_a_lost_token_answer_is_retriable_never_unknown() -> None:
    def aggregator(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    ev = EvAggregatorClient(BASE, "dercmd", "s3cret", transport=httpx.MockTransport(aggregator))
    with pytest.raises(EvAggregatorError) as caught:
        await ev.create_action("v", "START_CHARGING", "c1")
    await ev.aclose()
    assert (caught.value.retriable, caught.value.unknown) == (True, False)


@pytest.mark.parametrize(
    ("answer", "status", "retriable", "unknown", "retry_after_s"),
    [
        (httpx.Response(404, json={"message": "unknown vehicle"}), 404, False, False, None),
        (httpx.Response(409, json={"message": "not plugged in"}), 409, False, False, None),
        (httpx.Response(422, json={"message": "key reused"}), 422, False, False, None),
        (httpx.Response(429, headers={"Retry-After": "7"}), 429, True, False, 7.0),
        (httpx.Response(503), 503, True, False, None),
        (httpx.Response(504), 504, True, True, None),  # a gateway gave up: the aggregator may have acted
        (httpx.Response(202, json={"id": "a1"}), 202, False, True, None),  # malformed: unknown
        (httpx.Response(202, json=ACTION | {"idempotencyKey": "other"}), 202, False, True, None),
    ],
)
async def test_each_answer_of_an_action_request_is_an_error_of_its_class(
    answer: httpx.Response, status: int, retriable: bool, unknown: bool, retry_after_s: float | None,
) -> None:
    ev = client(Aggregator(lambda r: answer))
    with pytest.raises(EvAggregatorError) as caught:
        await ev.create_action("v", "START_CHARGING", "c1")
    await ev.aclose()
    error = caught.value
    assert (error.status, error.retriable, error.unknown, error.retry_after_s) == (status, retriable, unknown, retry_after_s)


@pytest.mark.parametrize(
    ("failure", "retriable", "unknown"),
    [
        (httpx.ConnectError("refused"), True, False),  # never left
        (httpx.ReadTimeout("gave up"), False, True),  # left, no answer
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), False, True),
        (httpx.ReadError(""), False, True),
    ],
)
async def test_transport_failures_of_an_action_request(failure: Exception, retriable: bool, unknown: bool) -> None:
    def api(request: httpx.Request) -> httpx.Response:
        raise failure

    ev = client(Aggregator(api))
    with pytest.raises(EvAggregatorError) as caught:
        await ev.create_action("v", "START_CHARGING", "c1")
    await ev.aclose()
    assert (caught.value.retriable, caught.value.unknown) == (retriable, unknown)


async def test_an_action_no_key_made_is_none_and_the_webhook_subscription_is_a_put() -> None:
    aggregator = Aggregator(lambda r: httpx.Response(404 if r.method == "GET" else 204, json={} if r.method == "GET" else None))
    ev = client(aggregator)
    assert await ev.action_by_key("never-sent") is None
    await ev.subscribe_webhook("http://dispatch.test/callbacks/ev-aggregator", "whsec")
    await ev.aclose()
    put = aggregator.api_requests()[-1]
    assert (put.method, put.url.path) == ("PUT", "/ev-aggregator/v1/webhooks")
    assert json.loads(put.content) == {"url": "http://dispatch.test/callbacks/ev-aggregator", "secret": "whsec"}


async def test_a_failed_lookup_by_key_is_an_error_not_none() -> None:
    ev = client(Aggregator(lambda r: httpx.Response(500)))
    with pytest.raises(EvAggregatorError):
        await ev.action_by_key("c1")
    await ev.aclose()


def test_a_webhook_signature_covers_exactly_its_id_time_and_raw_body_and_a_stale_one_is_refused() -> None:
    body = b'{"event":"action.updated","action":{}}'
    signature = sign("whsec", body, 1_000, "w1")
    assert signature.startswith("sha256=") and len(signature) == 7 + 64

    def why(secret: str = "whsec", b: bytes = body, sig: str | None = signature, ts: str | None = "1000",
            wid: str | None = "w1", now: float = 1_010) -> str | None:
        return refusal(secret, b, sig, ts, wid, now=now, tolerance_s=300)

    assert why() is None
    assert why(secret="other") == "invalid_signature"
    assert why(b=body + b" ") == "invalid_signature"
    assert why(sig=None) == "invalid_signature"
    assert why(ts="1001") == "invalid_signature"  # the time is signed
    assert why(ts=None) == why(ts="soon") == "invalid_signature"
    assert why(wid="w2") == "invalid_signature"  # and so is the id
    assert why(now=1_301) == "stale_webhook"  # a genuine webhook, replayed after its window
    assert why(now=699) == "stale_webhook"
