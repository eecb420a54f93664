"""A simulated EV-cloud aggregator (see :mod:`dercmd.protocols.ev_aggregator`) in front of the
fleet's ``ev-aggregator`` vehicles: it issues OAuth2 access tokens for its one client (they
expire after ``token_ttl_s``: a short lifetime makes clients renew), makes one action per
idempotency key, records each new action once as what the vehicle received, confirms it
``confirm_delay_s`` later and POSTs the signed webhook to the subscriber, if there is one
(retried once, then counted in ``CALLBACK_ERRORS``).

Every vehicle is plugged in unless ``PUT /sim/ev-aggregator/vehicles/{id}`` says otherwise: an
unplugged vehicle refuses ``START_CHARGING`` (409), and a start still pending when its vehicle
is unplugged ends FAILED. Stopping always succeeds.

The fault plans (:mod:`..faults`, ``PUT /sim/faults``) apply to action requests:

    latency            the action is made, the answer comes ``latencyMs`` late
    5xx / 429          503 / 429 with Retry-After, before anything is made
    timeout_after_act  the action is made, the answer is held back ``hangS``
    drop_connection    the action is made, then the TCP connection is closed without an
                       answer (uvicorn's transport, :func:`~..backend.drop_connection`)
    lose_callback      the action is made and answered and confirms, but its webhook is never
                       sent: only asking finds its state

A repeated request (the same key) answers the action made the first time, whatever fault it
draws after the before-acting ones. Token requests and reads of actions draw no faults.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from dercmd.events import utcnow
from dercmd.fleet import Entity, Fleet
from dercmd.protocols.ev_aggregator import (
    ACTION_TYPES,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ActionRequest,
    EvAggregatorSettings,
    WebhookSubscription,
    sign,
)

from .. import metrics
from ..backend import SimBackend, before_answering, dumps, json_response
from ..faults import FaultKind, Faults
from ..recorder import Recorder
from ..registry import SimContext, simulates

log = logging.getLogger(__name__)

BACKEND = "ev-aggregator"
RETRY_DELAY_S = 0.2  # before the one retry of a failed webhook
#: The aggregator's action types, as dercmd's command types (what the recorder keeps).
COMMAND_TYPES = {action: command for command, action in ACTION_TYPES.items()}
_JSON = {"Content-Type": "application/json"}


@dataclass
class SimAction:
    id: str
    vehicle_id: str
    entity_id: str
    type: str
    idempotency_key: str
    created_at: datetime
    lose_callback: bool = False
    state: str = "PENDING"
    failure_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "vehicleId": self.vehicle_id, "type": self.type, "state": self.state,
            "idempotencyKey": self.idempotency_key, "createdAt": self.created_at.isoformat(),
        }
        if self.failure_reason is not None:
            out["failureReason"] = self.failure_reason
        return out


class VehicleBody(BaseModel):
    """``PUT /sim/ev-aggregator/vehicles/{id}``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    plugged_in: bool


class EvAggregatorSim(SimBackend):
    name = BACKEND

    def __init__(
        self, fleet: Fleet, recorder: Recorder, client_id: str, client_secret: str, confirm_delay_s: float, *,
        token_ttl_s: int = 3600, transport: httpx.AsyncBaseTransport | None = None, faults: Faults | None = None,
    ) -> None:
        super().__init__(fleet, recorder, client_secret, 0.0, transport=transport, faults=faults)
        self._client = (client_id, client_secret)
        self._confirm_delay_s = confirm_delay_s
        self._token_ttl_s = token_ttl_s
        self._tokens: dict[str, float] = {}  # access token -> when it expires (loop clock)
        self.tokens_issued = 0
        self.actions: dict[str, SimAction] = {}
        self._by_key: dict[str, SimAction] = {}
        self._id_prefix = uuid.uuid4().hex[:12]
        self._numbers = itertools.count(1)
        self.unplugged: set[str] = set()  # vehicle ids
        self.webhook: WebhookSubscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

        api = self.router  # /ev-aggregator/v1, with SimBackend's report routes (no EV measures)
        api.add_api_route(
            "/vehicles/{vehicleId}/actions", self.create_action, methods=["POST"], response_model=None, status_code=202,
            summary="Ask a vehicle for an action (body: ActionRequest; header Idempotency-Key)",
            description="The protocol is described in `dercmd.protocols.ev_aggregator`.",
        )
        api.add_api_route("/actions/{actionId}", self.get_action, methods=["GET"], response_model=None, summary="An action")
        api.add_api_route("/actions", self.find_action, methods=["GET"], response_model=None,
                          summary="The action of an idempotency key (?idempotencyKey=)")
        api.add_api_route("/webhooks", self.subscribe_webhook, methods=["PUT"], response_model=None, status_code=204,
                          summary="Where action updates are POSTed (body: WebhookSubscription)")
        self.router = APIRouter()
        self.router.include_router(api)
        self.router.add_api_route(f"/{BACKEND}/oauth/token", self.issue_token, methods=["POST"], response_model=None,
                                  tags=[BACKEND], summary="OAuth2 client credentials (form-encoded)")
        self.router.add_api_route(f"/sim/{BACKEND}/vehicles/{{vehicleId}}", self.put_vehicle, methods=["PUT"],
                                  response_model=None, tags=["sim"], summary="Plug a simulated vehicle in or out")

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().aclose()

    # -- OAuth2 --------------------------------------------------------------------------

    async def issue_token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
        if form.get("grant_type") != "client_credentials":
            return json_response({"error": "unsupported_grant_type"}, 400)
        if (form.get("client_id"), form.get("client_secret")) != self._client:
            return json_response({"error": "invalid_client"}, 401)
        now = asyncio.get_running_loop().time()
        self._tokens = {t: until for t, until in self._tokens.items() if until > now}
        token = secrets.token_urlsafe(24)
        self._tokens[token] = now + self._token_ttl_s
        self.tokens_issued += 1
        return json_response({"access_token": token, "token_type": "Bearer", "expires_in": self._token_ttl_s})

    def authorized(self, request: Request) -> bool:
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        until = self._tokens.get(token)
        return scheme.lower() == "bearer" and until is not None and until > asyncio.get_running_loop().time()

    # -- actions -------------------------------------------------------------------------

    async def create_action(self, request: Request) -> Response:
        if not self.authorized(request):
            return json_response({"error": "invalid_token"}, 401)
        vehicle_id = request.path_params["vehicleId"]
        entity = self.devices.get(vehicle_id)
        if entity is None:
            return json_response({"message": f"unknown vehicle {vehicle_id}"}, 404)
        key = request.headers.get("idempotency-key")
        if not key:
            return json_response({"message": "Idempotency-Key is required"}, 400)
        try:
            body = ActionRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return json_response({"message": f"malformed ActionRequest: {str(exc)[:2000]}"}, 400)
        fault = self.faults.draw(entity.id)
        if fault is not None and fault.kind is FaultKind.RATE_LIMITED:
            return Response(dumps({"message": "rate limited (fault injected)"}), status_code=429, media_type="application/json",
                            headers={"Retry-After": f"{fault.retry_after_s:g}"})
        if fault is not None and fault.kind is FaultKind.ERROR_5XX:
            return json_response({"message": "unavailable (fault injected)"}, 503)
        action = self._by_key.get(key)
        if action is None:
            if body.type == "START_CHARGING" and vehicle_id in self.unplugged:
                return json_response({"message": f"vehicle {vehicle_id} is not plugged in"}, 409)
            action = self._create(entity, body.type, key, lose_callback=fault is not None and fault.kind is FaultKind.LOSE_CALLBACK)
        elif (action.vehicle_id, action.type) != (vehicle_id, body.type):
            return json_response({"message": f"Idempotency-Key {key} was used for another request"}, 422)
        if (dropped := await before_answering(request, fault)) is not None:
            return dropped
        return json_response(action.to_json(), 202)  # as it is by now: it may have been carried out

    async def get_action(self, request: Request) -> Response:
        if not self.authorized(request):
            return json_response({"error": "invalid_token"}, 401)
        action = self.actions.get(request.path_params["actionId"])
        return json_response(action.to_json()) if action else json_response({"message": "no such action"}, 404)

    async def find_action(self, request: Request) -> Response:
        if not self.authorized(request):
            return json_response({"error": "invalid_token"}, 401)
        key = request.query_params.get("idempotencyKey")
        if not key:
            return json_response({"message": "idempotencyKey is required (actions are not listed)"}, 400)
        action = self._by_key.get(key)
        return json_response(action.to_json()) if action else json_response({"message": "no action has this key"}, 404)

    def _create(self, entity: Entity, type: str, key: str, *, lose_callback: bool) -> SimAction:
        now = utcnow()
        action = SimAction(f"act-{self._id_prefix}-{next(self._numbers)}", entity.device_id, entity.id, type, key, now,
                           lose_callback=lose_callback)
        self.actions[action.id] = action
        self._by_key[key] = action
        self.recorder.record(entity.id, BACKEND, key, COMMAND_TYPES[type], None, now)
        self.received.inc()
        task = asyncio.get_running_loop().create_task(self._carry_out(action), name=f"ev-aggregator-{action.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return action

    async def _carry_out(self, action: SimAction) -> None:
        await asyncio.sleep(self._confirm_delay_s)
        if action.type == "START_CHARGING" and action.vehicle_id in self.unplugged:
            action.state, action.failure_reason = "FAILED", "vehicle unplugged"
        else:
            action.state = "CONFIRMED"
        if action.lose_callback:
            log.info("webhook lost (fault injected)", extra={"action": action.id, "command_id": action.idempotency_key})
            return
        if self.webhook is not None:
            await self._post_webhook(self.webhook, action)

    # -- webhooks ------------------------------------------------------------------------

    async def subscribe_webhook(self, request: Request) -> Response:
        body = await self.read(request, WebhookSubscription)
        if isinstance(body, Response):
            return body
        self.webhook = body
        return Response(status_code=204)

    async def _post_webhook(self, subscription: WebhookSubscription, action: SimAction) -> None:
        body = dumps({"event": "action.updated", "action": action.to_json()}).encode()
        webhook_id = uuid.uuid4().hex  # the same on the retry: the receiver takes it once
        error: str | None = None
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(RETRY_DELAY_S)
            timestamp = int(time.time())  # signed anew for each try, as real senders do
            headers = _JSON | {ID_HEADER: webhook_id, TIMESTAMP_HEADER: str(timestamp),
                               SIGNATURE_HEADER: sign(subscription.secret, body, timestamp, webhook_id)}
            try:
                response = await self.http.post(subscription.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = repr(exc)
                continue
            if response.is_success:
                return
            error = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code < 500 and response.status_code != 429:
                break  # refused: sending it again will not help
        metrics.CALLBACK_ERRORS.inc()
        log.warning("webhook not delivered", extra={"url": subscription.url, "error": error, "command_id": action.idempotency_key})

    # -- the simulation's own controls ---------------------------------------------------

    async def put_vehicle(self, request: Request) -> Response:
        vehicle_id = request.path_params["vehicleId"]
        if vehicle_id not in self.devices:
            return json_response({"message": f"no vehicle {vehicle_id} on the EV aggregator"}, 404)
        try:
            body = VehicleBody.model_validate_json(await request.body())
        except ValidationError as exc:
            return json_response({"message": str(exc)[:2000]}, 400)
        if body.plugged_in:
            self.unplugged.discard(vehicle_id)
        else:
            self.unplugged.add(vehicle_id)
        return json_response({"vehicleId": vehicle_id, "pluggedIn": body.plugged_in})


@simulates(BACKEND)
def _create(context: SimContext) -> EvAggregatorSim:
    settings, own = context.settings, EvAggregatorSettings()
    return EvAggregatorSim(
        context.fleet, context.recorder, own.client_id, own.client_secret, settings.sim_confirm_delay_ms / 1000,
        token_ttl_s=settings.sim_token_ttl_s, transport=context.transport, faults=context.faults,
    )
