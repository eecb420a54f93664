"""Backend ``ocpp``: charge points speaking OCPP 1.6J to dercmd's OCPP gateway
(:mod:`dercmd.ocpp_gateway`; the exchange is :mod:`dercmd.protocols.ocpp`).

A charge point holds one WebSocket to one gateway replica, which records itself in Redis
(:mod:`dercmd.state.ocpp`). For each command this backend reads that record and asks that
replica over HTTP to make the OCPP call on the open connection: StartCharging is
RemoteStartTransaction on connector 1 with an idTag derived from the command, StopCharging is
RemoteStopTransaction of the transaction the charge point runs. The charge point's
``Accepted`` makes the command Sent (:attr:`Confirmation.ASYNC`): its transaction message
(StartTransaction carrying the idTag, StopTransaction of that transaction) is the result, which
the gateway POSTs to ``/callbacks/ocpp`` (this package's route on dispatch's server) with the
token dispatch gave. ``Rejected`` is a refusal, and so is a charge point that never connected
(unknown, as a vendor's 404); one that connected before and is not connected now, or a
CALLERROR before the charge point acted, is not delivered; a call that got no answer is
unknown, and :meth:`OcppBackend.outcomes` says what became of it from what the gateway recorded
(and, for a command accepted without a transaction message, from the charge point read back).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

import httpx
from fastapi import APIRouter
from pydantic import ValidationError

from dercmd.fleet import EntityKind
from dercmd.protocols.ocpp import (
    COMMANDS_PATH,
    OUTCOMES_PATH,
    PROFILE_OF,
    GatewayAnswer,
    GatewayCommand,
    GatewayError,
    GatewayFindings,
    GatewayOutcomesQuery,
    OcppResults,
    OcppSettings,
    id_tag,
)
from dercmd.state.ocpp import CommandState, OcppState

from ..base import (
    Accepted,
    BackendContext,
    BackendError,
    Capabilities,
    CommandOutcome,
    Confirmation,
    Delivery,
    DeliveryUnknown,
    Finding,
    NotDelivered,
    Query,
    Refused,
    register,
)
from ..callbacks import SignedResult, results_router

#: Path on dispatch's server where the gateway posts charge points' results.
CALLBACK_PATH = "/callbacks/ocpp"
#: Charge points, what OCPP's feature profiles carry (RemoteStart/StopTransaction).
CAPABILITIES = Capabilities(types=frozenset(PROFILE_OF), kinds=frozenset({EntityKind.CP}))
#: Commands whose outcome is read in one Redis round trip.
OUTCOMES_PER_CALL = 500


class OcppBackend:
    name = "ocpp"
    supported_types = CAPABILITIES.types
    max_batch = 100

    def __init__(self, context: BackendContext, settings: OcppSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``transport`` replaces the network under the calls to the gateway (tests)."""
        self._state = OcppState(context.redis)
        self._reconnect_wait_s = settings.reconnect_wait_s
        self._result_url = context.callback_base_url.rstrip("/") + CALLBACK_PATH
        self._http = httpx.AsyncClient(
            timeout=settings.http_timeout_s, transport=transport,
            headers={"authorization": f"Bearer {settings.gateway_token}"},
            limits=httpx.Limits(max_connections=self.max_batch, max_keepalive_connections=self.max_batch),
        )
        self.router = _results_router(context)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]:
        """Each charge point's commands in order, the charge points at once."""
        try:
            links = await self._state.links([d.entity.id for d in deliveries])
        except Exception as exc:  # nothing was sent
            raise NotDelivered("gateway_lookup_failed", repr(exc)) from exc
        answers: list[Accepted | BackendError | None] = [None] * len(deliveries)
        by_entity: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(deliveries):
            by_entity[d.entity.id].append(i)

        async def one_charge_point(positions: list[int]) -> None:
            for i in positions:
                answers[i] = await self._deliver(deliveries[i], links[i].url, links[i].seen)

        await asyncio.gather(*(one_charge_point(p) for p in by_entity.values()))
        return [a for a in answers if a is not None]

    async def _deliver(self, delivery: Delivery, gateway: str | None, seen: bool) -> Accepted | BackendError:
        """One command. A charge point seen before that is reconnecting (no link yet, or not
        booted on its new connection) is waited for a little: it usually is back within a
        second, and the command goes then rather than after dispatch's backoff."""
        order = delivery.order
        if order.type not in self.supported_types:
            return Refused("command_not_supported", f"OCPP carries no {order.type}")
        if not gateway and not seen:
            return Refused("unknown_device", f"charge point {delivery.entity.device_id} has never connected")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_wait_s
        while True:
            answer: Accepted | BackendError = NotDelivered("not_connected", f"charge point {delivery.entity.device_id} is connected to no gateway")
            if gateway:
                answer = await self._post(delivery, gateway)
            reconnecting = isinstance(answer, NotDelivered) and answer.reason in ("not_connected", "booting")
            if not reconnecting or loop.time() >= deadline:
                return answer
            await asyncio.sleep(0.05)
            try:
                gateway = await self._state.gateway_url(delivery.entity.id)
            except Exception:
                return answer

    async def _post(self, delivery: Delivery, gateway: str) -> Accepted | BackendError:
        order = delivery.order
        tag = id_tag(order.command_id)
        body = GatewayCommand(command_id=order.command_id, type=order.type, id_tag=tag, token=delivery.token, result_url=self._result_url)
        try:
            response = await self._http.post(
                gateway + COMMANDS_PATH.format(charge_point_id=delivery.entity.device_id), content=body.dump(),
                headers={"content-type": "application/json"},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # the request never left
            return NotDelivered("not_connected", f"gateway {gateway}: {exc!r}")
        except httpx.HTTPError as exc:  # it left: the charge point may have the command
            return DeliveryUnknown("delivery_unknown", f"gateway {gateway}: {exc!r}")
        return _answer(response, tag)

    async def outcomes(self, queries: Sequence[Query]) -> list[CommandOutcome]:
        """What the gateway recorded of each command: its transaction message came
        (SUCCEEDED); it was sent and no answer came (PENDING: the charge point may have acted,
        so it must not be sent again); the charge point rejected it (FAILED); it never left, or
        the charge point answered a CALLERROR, or there is no record (UNKNOWN: safe to send).
        One the charge point accepted without a transaction message yet is read back by the
        gateway holding it (PENDING where it cannot say)."""
        out: list[CommandOutcome] = []
        for start in range(0, len(queries), OUTCOMES_PER_CALL):
            chunk = queries[start : start + OUTCOMES_PER_CALL]
            try:
                recorded = await self._state.command_states([(q.entity.id, q.command_id) for q in chunk])
            except Exception as exc:
                raise NotDelivered("outcome_lookup_failed", repr(exc)) from exc
            found = [_outcome(state) for state, _ in recorded]
            # Accepted, no transaction message: ask the charge point itself, one call per charge point.
            asking: dict[tuple[str, str], list[int]] = defaultdict(list)
            for i, (q, (state, url)) in enumerate(zip(chunk, recorded, strict=True)):
                if state is CommandState.ACCEPTED and url:
                    asking[(url, q.entity.device_id)].append(i)
            read = await asyncio.gather(*(self._read_back(url, cp, [chunk[i].command_id for i in positions])
                                          for (url, cp), positions in asking.items()))
            for positions, findings in zip(asking.values(), read, strict=True):
                for i, finding in zip(positions, findings, strict=True):
                    if finding is not None:
                        found[i] = finding
            out += found
        return out

    async def _read_back(self, gateway: str, charge_point_id: str, command_ids: list[str]) -> list[CommandOutcome | None]:
        """The gateway's findings for one charge point's commands (None each where it cannot say)."""
        try:
            response = await self._http.post(
                gateway + OUTCOMES_PATH.format(charge_point_id=charge_point_id),
                content=GatewayOutcomesQuery(command_ids=command_ids).dump(), headers={"content-type": "application/json"},
            )
            if response.status_code == 200:
                findings = GatewayFindings.model_validate_json(response.content).findings
                if len(findings) == len(command_ids):
                    return [CommandOutcome(Finding(f.finding), f.message) for f in findings]
        except (httpx.HTTPError, ValidationError):
            pass
        return [None] * len(command_ids)


def _outcome(state: CommandState | None) -> CommandOutcome:
    if state is CommandState.SUCCEEDED:
        return CommandOutcome(Finding.SUCCEEDED)
    if state is CommandState.ACCEPTED:
        return CommandOutcome(Finding.PENDING, "accepted, no transaction message yet")
    if state is CommandState.SENDING:
        return CommandOutcome(Finding.PENDING, "sent and never answered: the charge point may have it")
    if state is CommandState.REJECTED:
        return CommandOutcome(Finding.FAILED, "the charge point rejected it")
    return CommandOutcome(Finding.UNKNOWN, f"gateway record: {state or 'none'}")


def _answer(response: httpx.Response, tag: str) -> Accepted | BackendError:
    """The gateway's answer as the outcome dispatch decides from."""
    if response.status_code == 200:
        try:
            answer = GatewayAnswer.model_validate_json(response.content)
        except ValidationError as exc:
            return DeliveryUnknown("delivery_unknown", f"unreadable gateway answer: {exc}")
        if answer.status == "Accepted":
            return Accepted(Confirmation.ASYNC, tag)
        return Refused("rejected", "the charge point rejected the command")
    try:
        error = GatewayError.model_validate_json(response.content)
    except ValidationError:
        error = GatewayError(key=f"http_{response.status_code}", message=response.text[:500])
    status = response.status_code
    if status in (404, 503):
        return NotDelivered(error.key, error.message, retry_after_s=error.retry_after_s)
    if status == 409 or status == 422 or status == 502 or status == 401:
        return Refused(error.key if status != 401 else "backend_refused", error.message)
    # 504 (sent, no answer), or anything unexpected: the charge point may have it.
    return DeliveryUnknown("delivery_unknown", f"HTTP {status} {error.key}: {error.message}")


def _results_router(context: BackendContext) -> APIRouter:
    return results_router(CALLBACK_PATH, OcppResults, lambda body: [SignedResult(r.token, r.command_id, r.succeeded, r.message) for r in body.results], context)


@register("ocpp", OcppSettings, CAPABILITIES)
def _create(context: BackendContext) -> OcppBackend:
    return OcppBackend(context, OcppSettings())


__all__ = ["CALLBACK_PATH", "OcppBackend", "OcppSettings"]
