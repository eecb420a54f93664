"""An EV-cloud aggregator's API (the shape of Smartcar, Enode and the like): one cloud that has
onboarded vehicles of several makes and steers them through one REST API. A caller
authenticates with OAuth2 client credentials, asks for one action per vehicle, and learns the
action's outcome by webhook, or by asking.

    POST {base}/oauth/token   application/x-www-form-urlencoded
        grant_type=client_credentials&client_id=...&client_secret=...
        -> 200 {"access_token", "token_type": "Bearer", "expires_in": <seconds>}
           401 {"error": "invalid_client"}, 400 {"error": "unsupported_grant_type"}
    every other call: Authorization: Bearer <access_token>; 401 when it is unknown or expired

    POST {base}/v1/vehicles/{vehicleId}/actions   Idempotency-Key: <key>
        body ActionRequest {"type": "START_CHARGING" | "STOP_CHARGING"}
        -> 202 Action {"id", "vehicleId", "type", "state": "PENDING", "idempotencyKey", "createdAt"}
           The same key answers the same action again (202), never a second one; a key
           reused for another vehicle or type is 422.
           404 unknown vehicle, 409 refused (e.g. not plugged in), 429 rate limited
           (Retry-After), 5xx: nothing was created
    GET  {base}/v1/actions/{actionId}              -> 200 Action, 404
    GET  {base}/v1/actions?idempotencyKey=<key>    -> 200 Action, 404 (no action has that key)
        state: PENDING (the vehicle has not carried it out yet), CONFIRMED, FAILED (with
        "failureReason")
    PUT  {base}/v1/webhooks   body WebhookSubscription {"url", "secret"}   -> 204
        One subscription per client (a PUT replaces it): from now on every change of an
        action's state is POSTed to ``url``:
        POST {url}   X-Webhook-Id: <id, the same on retries>   X-Timestamp: <Unix seconds>
                     X-Signature: sha256=<hex HMAC-SHA256 of "<id>.<timestamp>.<raw body>", keyed by secret>
            (a receiver refuses a timestamp more than a few minutes off, and an id it took before)
            body WebhookEvent {"event": "action.updated", "action": Action}
        The aggregator retries a POST that failed, but a webhook can still be lost: the
        action's state is what counts, and it can always be asked for.

The idempotency key comes back in every action (and so in every webhook): a caller that uses
its own command id as the key needs no mapping from action ids to its commands.

:class:`EvAggregatorClient` caches its access token and fetches a new one shortly before it
expires, and once more when a call is answered 401 (a token revoked or expired early: the
aggregator acted on nothing, so repeating the call is safe). Nothing else here retries; the
caller decides from :class:`EvAggregatorError` (see
:class:`~dercmd.protocols.common.DeviceApiError`). A failed token request never counts as
``unknown``: no action had left.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from dercmd.settings import ServiceSettings

from .common import DeviceApiError, JsonClient, Wire
from .settings import BackendSettings

__all__ = [
    "ACTION_TYPES",
    "Action",
    "ActionRequest",
    "EvAggregatorClient",
    "EvAggregatorError",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TokenAnswer",
    "WebhookEvent",
    "WebhookSubscription",
    "refusal",
    "sign",
]

#: dercmd's command types, as the aggregator's action types.
ACTION_TYPES: dict[str, str] = {"StartCharging": "START_CHARGING", "StopCharging": "STOP_CHARGING"}
SIGNATURE_HEADER = "X-Signature"
#: When the webhook was sent (Unix seconds) and its id (the same on the aggregator's retries).
TIMESTAMP_HEADER = "X-Timestamp"
ID_HEADER = "X-Webhook-Id"
#: A token is renewed this long before it expires (at most a fifth of its lifetime).
REFRESH_BEFORE_S = 60.0

ActionState = Literal["PENDING", "CONFIRMED", "FAILED"]


class ActionRequest(Wire):
    type: Literal["START_CHARGING", "STOP_CHARGING"]


class Action(Wire):
    id: str
    vehicle_id: str
    type: str
    state: ActionState
    idempotency_key: str | None = None
    failure_reason: str | None = None
    created_at: datetime | None = None


class WebhookSubscription(Wire):
    url: str
    secret: str


class WebhookEvent(Wire):
    event: str
    action: Action


class TokenAnswer(BaseModel):
    """RFC 6749 section 5.1 (snake_case on the wire). Without ``expires_in`` a token is used
    until it is refused."""

    access_token: str
    token_type: str = "Bearer"
    expires_in: float | None = None


def sign(secret: str, body: bytes, timestamp: int, webhook_id: str) -> str:
    """The ``X-Signature`` value of a webhook: HMAC-SHA256 over its id, its timestamp and its
    raw body (``<id>.<timestamp>.<body>``), so none of them can be changed or reused alone."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def refusal(secret: str, body: bytes, signature: str | None, timestamp: str | None, webhook_id: str | None, *,
            now: float, tolerance_s: float) -> str | None:
    """Why a webhook is refused (``invalid_signature``: not the aggregator's for exactly this id,
    time and body; ``stale_webhook``: its time is more than ``tolerance_s`` from ``now``), or
    None: it is genuine and fresh. A replay inside the window has a valid signature: the
    receiver recognises it by its id."""
    if signature is None or not timestamp or not timestamp.isdigit() or not webhook_id or len(webhook_id) > 128:
        return "invalid_signature"
    if not hmac.compare_digest(signature, sign(secret, body, int(timestamp), webhook_id)):
        return "invalid_signature"
    if abs(now - int(timestamp)) > tolerance_s:
        return "stale_webhook"
    return None


class EvAggregatorError(DeviceApiError):
    """A call to the aggregator failed (see :class:`~dercmd.protocols.common.DeviceApiError`)."""


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    renew_at: float  # on the client's clock


class EvAggregatorClient(JsonClient):
    """One aggregator account (client credentials), over a pool of keep-alive connections."""

    error = EvAggregatorError

    def __init__(
        self, base_url: str, client_id: str, client_secret: str, *, timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(base_url, None, timeout_s=timeout_s, transport=transport)
        self._credentials = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
        self._clock = clock
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()  # concurrent calls that find no valid token fetch one together
        #: Access tokens fetched so far (metrics, tests).
        self.tokens_fetched = 0

    # -- actions -------------------------------------------------------------------------

    async def create_action(self, vehicle_id: str, type: str, idempotency_key: str) -> Action:
        """Ask the vehicle to ``type`` (``START_CHARGING``, ``STOP_CHARGING``); the same key
        returns the action it made the first time."""
        response = await self._authorized(
            "POST", f"/v1/vehicles/{quote(vehicle_id, safe='')}/actions", ActionRequest(type=type), ok=202,  # type: ignore[arg-type]
            headers={"Idempotency-Key": idempotency_key},
        )
        action = self.read(response, Action)
        if action.idempotency_key not in (None, idempotency_key):
            raise self.error(f"answer is for another key: {action.idempotency_key!r}", status=202, retriable=False, unknown=True)
        return action

    async def action(self, action_id: str) -> Action:
        return self.read(await self._authorized("GET", f"/v1/actions/{quote(action_id, safe='')}"), Action)

    async def action_by_key(self, idempotency_key: str) -> Action | None:
        """The action made with ``idempotency_key``, or None when there is none (the request
        that would have made it never reached the aggregator, or was refused)."""
        try:
            response = await self._authorized("GET", "/v1/actions", params={"idempotencyKey": idempotency_key})
        except EvAggregatorError as exc:
            if exc.status == 404:
                return None
            raise
        return self.read(response, Action)

    async def subscribe_webhook(self, url: str, secret: str) -> None:
        """From now on every change of an action's state is POSTed to ``url``, signed with ``secret``."""
        await self._authorized("PUT", "/v1/webhooks", WebhookSubscription(url=url, secret=secret), ok=204)

    # -- authentication ------------------------------------------------------------------

    async def _authorized(
        self, method: str, path: str, body: Wire | None = None, *, ok: int = 200, params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        token = await self._access_token()
        try:
            return await self.request(method, path, body, ok=ok, params=params, headers={**(headers or {}), "Authorization": f"Bearer {token}"})
        except EvAggregatorError as exc:
            if exc.status != 401:
                raise
        # Refused before anything was done: a token revoked or expired early. One new token,
        # one more try; a second 401 is the answer.
        self._forget(token)
        token = await self._access_token()
        return await self.request(method, path, body, ok=ok, params=params, headers={**(headers or {}), "Authorization": f"Bearer {token}"})

    async def _access_token(self) -> str:
        token = self._token
        if token is not None and self._clock() < token.renew_at:
            return token.value
        async with self._token_lock:
            token = self._token
            if token is None or self._clock() >= token.renew_at:
                token = self._token = await self._fetch_token()
            return token.value

    def _forget(self, value: str) -> None:
        """Drop the cached token if it is still ``value`` (a concurrent call may have renewed it)."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def _fetch_token(self) -> _Token:
        asked_at = self._clock()
        try:
            response = await self.request("POST", "/oauth/token", form=self._credentials)
            answer = TokenAnswer.model_validate_json(response.content)
        except EvAggregatorError as exc:
            if not exc.unknown:
                raise
            # The token request's answer was lost: no action left, so trying again is safe.
            raise self.error(f"no access token: {exc}", status=exc.status, retriable=True) from exc
        except ValidationError as exc:
            raise self.error(f"malformed token answer: {exc}", status=response.status_code, retriable=True) from exc
        if answer.token_type.lower() != "bearer":
            raise self.error(f"token type {answer.token_type!r} is not Bearer", status=response.status_code, retriable=False)
        self.tokens_fetched += 1
        if answer.expires_in is None:
            return _Token(answer.access_token, float("inf"))
        # Counted from when it was asked for: the aggregator's clock started no later.
        return _Token(answer.access_token, asked_at + answer.expires_in - min(REFRESH_BEFORE_S, answer.expires_in / 5))


class EvAggregatorSettings(BackendSettings):
    model_config = SettingsConfigDict(env_prefix="DERCMD_EV_AGGREGATOR_", extra="ignore")
    LOCAL = ("url",)

    url: str = Field("", description="Base URL of the EV aggregator; empty: the local simulator.")
    client_id: str = Field("dercmd", description="OAuth2 client id dispatch authenticates with (client credentials).")
    client_secret: str = Field("sim-ev-aggregator-secret", description="OAuth2 client secret dispatch authenticates with.")
    timeout_s: float = Field(5.0, gt=0, description="Deadline of one call to the EV aggregator, in seconds.")
    webhook_secret: str = Field(
        "dercmd-dev-ev-aggregator-webhook-secret",
        description="Key of the HMAC-SHA256 the aggregator signs its webhooks with (dispatch subscribes with it; shared by all replicas; set your own).",
    )
    webhook_tolerance_s: float = Field(
        300.0, gt=0, description="A webhook whose X-Timestamp is further than this from now is refused (stale_webhook); one whose id was taken within it is a replay, answered and ignored.",
    )
    poll_interval_s: float = Field(
        5.0, gt=0, description="How often an action still pending is asked about, the first time this long after it was sent (the fallback for lost webhooks).",
    )

    def base_url(self, settings: ServiceSettings) -> str:
        return self.url or f"http://{settings.bind_host}:{settings.simulator_port}/ev-aggregator"
