"""The OCPP 1.6J central system: the charge points' WebSockets, what they say, and the calls
dispatch asks this replica to make on them.

Per connection: the charge point is one of the fleet's ``ocpp`` entities (its id in the URL is
the entity's device id; any other is refused before the handshake completes); the replica
records itself as the holder in Redis (the link of :mod:`dercmd.state.ocpp`: its URL and the
connection's id, expiring after three heartbeat intervals without a message, re-asserted by any
message the charge point sends: OCPP 1.6 lets any message stand for a Heartbeat), and on
close removes that record only if it is still this connection's (the charge point may already
be connected elsewhere).
After the charge point's BootNotification (or its first message, for one that reconnects
without booting) the gateway asks ``GetConfiguration(SupportedFeatureProfiles)``: what it
declared decides which commands reach it.

What the charge point did is kept in Redis (:mod:`dercmd.state.ocpp`), not in this process, so
any replica (and dispatch's outcome queries) sees it after a reconnect elsewhere or a restart:
each command sent, the idTag of a start, the transaction a stop asked to end, the running
transaction. A StartTransaction whose idTag is a command's, or a StopTransaction of a
transaction a command asked to stop, is that command's result: it is POSTed to the ``resultUrl`` dispatch gave (retried for about a minute;
dispatch's delivery check reads the same record after that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis
from fastapi import WebSocket, WebSocketDisconnect
from ocpp.exceptions import GenericError, InternalError, NotImplementedError, NotSupportedError, OCPPError
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action, AuthorizationStatus, MessageTrigger, RegistrationStatus, RemoteStartStopStatus, TriggerMessageStatus

from dercmd.events import CommandStatus, CommandType
from dercmd.fleet import Entity, Fleet
from dercmd.kafka import clip
from dercmd.protocols.ocpp import (
    CHARGING_STATUSES,
    CONNECTOR_ID,
    IDLE_STATUSES,
    PROFILE_OF,
    REMOTE_TRIGGER,
    SUBPROTOCOL,
    SUPPORTED_FEATURE_PROFILES,
    GatewayAnswer,
    GatewayCommand,
    GatewayError,
    GatewayFinding,
    GatewayFindings,
    OcppResult,
    OcppResults,
    OcppSettings,
    basic_credentials,
    new_message_id,
    parse_profiles,
    password_matches,
)
from dercmd.settings import OcppGatewaySettings
from dercmd.state.delivery import Deliveries, Stage
from dercmd.state.ocpp import CommandState, OcppState

from . import metrics

log = logging.getLogger(__name__)
#: The ocpp package logs every message at INFO: far too much for a fleet.
logging.getLogger("ocpp").setLevel(logging.WARNING)

T = TypeVar("T")

#: CALLERROR codes that mean the charge point could not take the message now and did not act.
_RETRIABLE = (InternalError, GenericError)
#: How long after a failed POST of a result the gateway tries again, in turn.
_REPORT_BACKOFF_S = (0.2, 0.5, 1, 2, 4, 8, 15, 30)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Socket:
    """A Starlette WebSocket as the connection the ocpp package reads and writes."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket

    async def recv(self) -> str:
        return await self._websocket.receive_text()

    async def send(self, message: str) -> None:
        await self._websocket.send_text(message)


class NotSent(Exception):
    """The call did not leave: the connection closed, or its turn did not come in time."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class NoAnswer(Exception):
    """The call left and no answer came (a timeout, the connection closed meanwhile)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(eq=False)
class Connection:
    entity: Entity
    websocket: WebSocket
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: OCPP-J allows one CALL at a time per direction.
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    profiles: frozenset[str] | None = None  # None: not declared yet
    booted: bool = False
    connectors: dict[int, str] = field(default_factory=dict)
    #: Read-backs waiting for the charge point's next StatusNotification of a connector.
    status_waiters: list[tuple[int, asyncio.Future[str]]] = field(default_factory=list)
    asking: asyncio.Task[None] | None = None
    charge_point: CentralChargePoint | None = None
    #: When a message last kept the link alive (monotonic).
    held_at: float = 0.0


def _authenticated(websocket: WebSocket, charge_point_id: str, password_hash: str) -> bool:
    """HTTP Basic with the charge point's id as the user and its password (OCPP 1.6 security
    profile 1)."""
    credentials = basic_credentials(websocket.headers.get("authorization"))
    return credentials is not None and credentials[0] == charge_point_id and password_matches(password_hash, credentials[1])


class CentralChargePoint(ChargePoint):
    """One connected charge point, as the central system sees it: the answers to what it
    sends. The gateway's state lives in Redis (see the module's docstring)."""

    def __init__(self, gateway: Gateway, connection: Connection) -> None:
        super().__init__(connection.entity.device_id, _Socket(connection.websocket), response_timeout=gateway.ocpp.call_timeout_s)
        self.gateway = gateway
        self.connection = connection
        self.entity_id = connection.entity.id

    async def route_message(self, raw_msg: str | bytes) -> None:
        """Any message from the charge point shows it is there (OCPP 1.6 lets any message stand
        for a Heartbeat): its link is kept alive, at most once per half heartbeat interval."""
        now = time.monotonic()
        if now - self.connection.held_at >= self.gateway.ocpp.heartbeat_interval_s / 2:
            self.connection.held_at = now
            await self.gateway.hold(self.connection)
        await super().route_message(raw_msg)

    @on(Action.boot_notification)
    async def on_boot_notification(self, charge_point_vendor: str, charge_point_model: str, **_: Any) -> Any:
        metrics.RECEIVED.labels("BootNotification").inc()
        self.connection.booted = True
        await self.gateway.hold(self.connection)
        return call_result.BootNotification(
            current_time=_now(), interval=self.gateway.ocpp.heartbeat_interval_s, status=RegistrationStatus.accepted
        )

    @after(Action.boot_notification)
    async def after_boot_notification(self, **_: Any) -> None:
        self.gateway.ask_profiles(self.connection, again=True)

    @on(Action.heartbeat)
    async def on_heartbeat(self, **_: Any) -> Any:
        metrics.RECEIVED.labels("Heartbeat").inc()  # (its link was kept alive as it came in)
        self.gateway.ask_profiles(self.connection)
        return call_result.Heartbeat(current_time=_now())

    @on(Action.status_notification)
    async def on_status_notification(self, connector_id: int, error_code: str, status: str, **_: Any) -> Any:
        metrics.RECEIVED.labels("StatusNotification").inc()
        self.connection.connectors[connector_id] = status
        waiting = self.connection.status_waiters
        self.connection.status_waiters = [(c, f) for c, f in waiting if c != connector_id and not f.done()]
        for c, future in waiting:
            if c == connector_id and not future.done():
                future.set_result(status)
        self.gateway.ask_profiles(self.connection)
        return call_result.StatusNotification()

    @on(Action.authorize)
    async def on_authorize(self, id_tag: str, **_: Any) -> Any:
        # dercmd keeps no authorization list: its own idTags and any other are accepted.
        metrics.RECEIVED.labels("Authorize").inc()
        return call_result.Authorize(id_tag_info={"status": AuthorizationStatus.accepted})

    @on(Action.start_transaction)
    async def on_start_transaction(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **_: Any) -> Any:
        metrics.RECEIVED.labels("StartTransaction").inc()
        transaction_id, current = await self.gateway.transaction_started(self.entity_id, id_tag)
        # A start for a command that already ended otherwise (dercmd said Failed) is refused:
        # the charge point ends the transaction, and the car does not charge against the status.
        status = AuthorizationStatus.accepted if current else AuthorizationStatus.expired
        return call_result.StartTransaction(transaction_id=transaction_id, id_tag_info={"status": status})

    @on(Action.stop_transaction)
    async def on_stop_transaction(self, meter_stop: int, timestamp: str, transaction_id: int, **_: Any) -> Any:
        metrics.RECEIVED.labels("StopTransaction").inc()
        await self.gateway.transaction_stopped(self.entity_id, transaction_id)
        return call_result.StopTransaction(id_tag_info={"status": AuthorizationStatus.accepted})

    @on(Action.meter_values)
    async def on_meter_values(self, connector_id: int, **_: Any) -> Any:
        # Not published anywhere yet: OCPP measurements are not among dercmd's reports.
        metrics.RECEIVED.labels("MeterValues").inc()
        return call_result.MeterValues()


class Gateway:
    """Every charge point connected to this replica, and what is done on their connections.
    ``transport`` replaces the network under the results POSTed to dispatch (tests)."""

    def __init__(self, settings: OcppGatewaySettings, ocpp: OcppSettings, redis: aioredis.Redis, fleet: Fleet, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.ocpp = ocpp
        self.url = ocpp.own_url(settings)
        self.charge_points: dict[str, Entity] = {e.device_id: e for e in fleet.entities.values() if e.backend == "ocpp"}
        self.connections: dict[str, Connection] = {}
        self._http = httpx.AsyncClient(timeout=5.0, transport=transport)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.state = OcppState(redis)
        self.deliveries = Deliveries(redis)

    async def aclose(self) -> None:
        """Close every connection (each lets go of its link), stop reporting."""
        for connection in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await connection.websocket.close(code=1001)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()

    def _spawn(self, work: Awaitable[T], name: str) -> asyncio.Task[T]:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connections ---------------------------------------------------------------------

    async def serve(self, websocket: WebSocket, charge_point_id: str) -> None:
        """One charge point's WebSocket, from the handshake until it closes."""
        entity = self.charge_points.get(charge_point_id)
        if entity is None or SUBPROTOCOL not in websocket.scope.get("subprotocols", ()):
            metrics.CONNECTIONS.labels("refused").inc()
            log.warning("charge point refused", extra={"charge_point": clip(charge_point_id, 128), "known": entity is not None,
                                                       "subprotocols": websocket.scope.get("subprotocols")})
            await websocket.close(code=1008)
            return
        if entity.ocpp_password_hash is not None and not _authenticated(websocket, charge_point_id, entity.ocpp_password_hash):
            # Security profile 1: without its password, a connection under this id is refused
            # before the handshake completes, and never replaces the charge point's own.
            metrics.CONNECTIONS.labels("unauthenticated").inc()
            log.warning("charge point refused: not authenticated", extra={"charge_point": charge_point_id})
            await websocket.close(code=1008)
            return
        await websocket.accept(subprotocol=SUBPROTOCOL)
        connection = Connection(entity, websocket)
        connection.charge_point = CentralChargePoint(self, connection)
        previous = self.connections.get(charge_point_id)
        self.connections[charge_point_id] = connection
        if previous is not None:  # the charge point reconnected: the old socket is dead to it
            metrics.CONNECTIONS.labels("replaced").inc()
            with contextlib.suppress(Exception):
                await previous.websocket.close(code=1000)
        metrics.CONNECTIONS.labels("accepted").inc()
        metrics.CONNECTED.inc()
        try:
            await self._take_link(connection)
            await self.state.mark_seen(entity.id, _now())
            await connection.charge_point.start()
        except WebSocketDisconnect:
            pass
        except Exception as exc:
            if self.connections.get(charge_point_id) is not connection:
                # A newer connection of this charge point replaced (and closed) this one: its
                # next read or write fails, as expected. Not an error.
                log.info("charge point connection replaced", extra={"charge_point": charge_point_id, "error": repr(exc)})
            else:
                log.exception("charge point connection failed", extra={"charge_point": charge_point_id})
        finally:
            connection.closed.set()
            metrics.CONNECTED.dec()
            if connection.asking is not None:
                connection.asking.cancel()
            if self.connections.get(charge_point_id) is connection:
                del self.connections[charge_point_id]
            with contextlib.suppress(Exception):
                await self.state.release_link(entity.id, connection.id)
            with contextlib.suppress(Exception):
                await websocket.close()

    async def _take_link(self, connection: Connection) -> None:
        """This connection is the charge point's newest: it holds the link, whoever did before."""
        await self.state.take_link(connection.entity.id, self.url, connection.id, self.ocpp.link_ttl_s)

    async def hold(self, connection: Connection) -> None:
        if not connection.closed.is_set():
            await self.state.hold_link(connection.entity.id, connection.id, self.url, self.ocpp.link_ttl_s)

    def ask_profiles(self, connection: Connection, *, again: bool = False) -> None:
        """Ask what the charge point supports, unless that is known (or being asked) already."""
        if connection.closed.is_set() or (connection.asking is not None and not connection.asking.done()):
            return
        if connection.profiles is not None and not again:
            return
        connection.asking = self._spawn(self._ask_profiles(connection), f"profiles {connection.entity.id}")

    async def _ask_profiles(self, connection: Connection) -> None:
        try:
            answer = await self.call(connection, call.GetConfiguration(key=[SUPPORTED_FEATURE_PROFILES]))
        except OCPPError as exc:
            # It will not say: it declared nothing, and is asked again at its next boot.
            log.warning("GetConfiguration refused", extra={"entity_id": connection.entity.id, "error": repr(exc)})
            connection.profiles = frozenset()
            return
        except (NotSent, NoAnswer) as exc:  # asked again with its next message
            log.info("GetConfiguration unanswered", extra={"entity_id": connection.entity.id, "error": exc.key})
            return
        values = [k.get("value") or "" for k in answer.configuration_key or () if k.get("key") == SUPPORTED_FEATURE_PROFILES]
        connection.profiles = parse_profiles(values[0]) if values else frozenset()
        log.info("charge point declared", extra={"entity_id": connection.entity.id, "profiles": sorted(connection.profiles)})

    async def call(self, connection: Connection, payload: Any, unique_id: str | None = None) -> Any:
        """One CALL on the connection, in its turn (``unique_id``: its message id; None: a new
        one), its payload and the answer's checked against the OCPP 1.6 JSON schemas by the
        ocpp package: the charge point's answer, or the
        :class:`ocpp.exceptions.OCPPError` of its CALLERROR. Raises :class:`NotSent` when the
        call did not leave, :class:`NoAnswer` when it left and no answer came."""
        action = type(payload).__name__
        charge_point = connection.charge_point
        assert charge_point is not None
        try:
            async with asyncio.timeout(self.ocpp.call_timeout_s):
                await connection.turn.acquire()
        except TimeoutError:
            metrics.CALLS.labels(action, "busy").inc()
            raise NotSent("busy") from None
        try:
            if connection.closed.is_set():
                raise NotSent("not_connected")
            started = time.perf_counter()
            calling = asyncio.ensure_future(charge_point.call(payload, suppress=False, unique_id=unique_id or new_message_id()))
            closing = asyncio.ensure_future(connection.closed.wait())
            try:
                await asyncio.wait((calling, closing), return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
            if not calling.done():
                calling.cancel()
                metrics.CALLS.labels(action, "connection_closed").inc()
                raise NoAnswer("connection_closed")
            try:
                answer = calling.result()
            except TimeoutError:
                metrics.CALLS.labels(action, "no_answer").inc()
                raise NoAnswer("no_answer") from None
            except OCPPError:
                metrics.CALLS.labels(action, "call_error").inc()
                raise
            except Exception as exc:  # the socket failed under the send: whether it left is unknown
                metrics.CALLS.labels(action, "connection_closed").inc()
                raise NoAnswer("connection_closed") from exc
            metrics.CALL_SECONDS.labels(action).observe(time.perf_counter() - started)
            metrics.CALLS.labels(action, str(getattr(answer, "status", "answered"))).inc()
            return answer
        finally:
            connection.turn.release()

    # -- commands from dispatch ----------------------------------------------------------

    async def command(self, charge_point_id: str, command: GatewayCommand) -> tuple[int, GatewayAnswer | GatewayError]:
        """Make the command's OCPP call on the charge point's connection: the HTTP status
        and body of :mod:`dercmd.protocols.ocpp`'s exchange."""
        connection = self.connections.get(charge_point_id)
        if connection is None or connection.closed.is_set():
            return 404, GatewayError(key="not_connected", message=f"{charge_point_id} is not connected to {self.url}")
        if connection.profiles is None:
            self.ask_profiles(connection)
            return 503, GatewayError(key="booting", message="the charge point has not declared its feature profiles yet")
        profile = PROFILE_OF.get(command.type)
        if profile is None or profile not in connection.profiles:
            return 422, GatewayError(key="command_not_supported",
                                     message=f"declared profiles {sorted(connection.profiles)}; {command.type} needs {profile}")
        entity_id, command_id = connection.entity.id, command.command_id
        payload: Any
        transaction_id: int | None = None
        if command.type is CommandType.START_CHARGING:
            payload = call.RemoteStartTransaction(id_tag=command.id_tag, connector_id=CONNECTOR_ID)
        else:
            transaction_id = await self.state.running_transaction(entity_id)
            if transaction_id is None:
                return 409, GatewayError(key="no_transaction", message="no transaction is running on the charge point")
            payload = call.RemoteStopTransaction(transaction_id=transaction_id)
        # Before sending: the transaction message may come before (or instead of) the answer.
        # Every call has a message id of its own (a retry of the command too); the command is
        # correlated by this record, the start's idTag and the stop's transaction id.
        unique_id = new_message_id()
        await self.state.record_command(entity_id, command_id, command.type, command.id_tag, command.token, command.result_url,
                                        transaction_id, unique_id)
        log.debug("command call", extra={"command_id": command_id, "entity_id": entity_id, "message_id": unique_id})
        try:
            answer = await self.call(connection, payload, unique_id)
        except NotSent as exc:
            await self.state.advance(entity_id, command_id, CommandState.SENDING, CommandState.UNSENT)
            return (404 if exc.key == "not_connected" else 503), GatewayError(key=exc.key, message="the call was not sent")
        except NoAnswer as exc:
            return 504, GatewayError(key=exc.key, message=f"no answer within {self.ocpp.call_timeout_s} s")
        except OCPPError as exc:
            await self.state.advance(entity_id, command_id, CommandState.SENDING, CommandState.CALL_ERROR)
            detail = f"{exc.code}: {exc.description}"
            if isinstance(exc, (NotSupportedError, NotImplementedError)):
                return 422, GatewayError(key="command_not_supported", message=detail)
            if isinstance(exc, _RETRIABLE):
                retry = (exc.details or {}).get("retryAfterS") if isinstance(exc.details, dict) else None
                return 503, GatewayError(key="call_error", message=detail,
                                         retry_after_s=float(retry) if isinstance(retry, (int, float)) else None)
            return 502, GatewayError(key="call_error", message=detail)
        accepted = answer.status == RemoteStartStopStatus.accepted
        await self.state.advance(entity_id, command_id, CommandState.SENDING, CommandState.ACCEPTED if accepted else CommandState.REJECTED)
        return 200, GatewayAnswer(status="Accepted" if accepted else "Rejected")

    async def read_back(self, charge_point_id: str, command_ids: list[str]) -> tuple[int, GatewayFindings | GatewayError]:
        """Commands the charge point accepted with no transaction message yet: its connector,
        read back with TriggerMessage(StatusNotification), says whether each took effect (a
        start: a transaction runs; a stop: none does). The transaction message may still come,
        or may have been lost; either way the command did what it asked."""
        connection = self.connections.get(charge_point_id)
        if connection is None or connection.closed.is_set():
            return 404, GatewayError(key="not_connected", message=f"{charge_point_id} is not connected to {self.url}")
        entity_id = connection.entity.id

        records = await self.state.commands(entity_id, command_ids)
        status: str | None = None
        why = "the charge point cannot be read back (no RemoteTrigger profile)"
        if any(r.state is CommandState.ACCEPTED for r in records) and REMOTE_TRIGGER in (connection.profiles or ()):
            status, why = await self._connector_status(connection)
        findings: list[GatewayFinding] = []
        for command_id, record in zip(command_ids, records, strict=True):
            accepted = record.state is CommandState.ACCEPTED
            done = record.state is CommandState.SUCCEEDED or (accepted and status is not None and (
                (record.type is CommandType.START_CHARGING and status in CHARGING_STATUSES)
                or (record.type is CommandType.STOP_CHARGING and status in IDLE_STATUSES)))
            if done and accepted:
                await self.state.advance(entity_id, command_id, CommandState.ACCEPTED, CommandState.SUCCEEDED)
            findings.append(GatewayFinding(command_id=command_id, finding="SUCCEEDED" if done else "PENDING",
                                           message=f"connector {CONNECTOR_ID} {status}" if status else why))
        return 200, GatewayFindings(findings=findings)

    async def _connector_status(self, connection: Connection) -> tuple[str | None, str]:
        """Connector 1's status as the charge point reports it when asked now."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        connection.status_waiters.append((CONNECTOR_ID, future))
        try:
            answer = await self.call(connection, call.TriggerMessage(requested_message=MessageTrigger.status_notification,
                                                                     connector_id=CONNECTOR_ID))
            if answer.status != TriggerMessageStatus.accepted:
                return None, f"TriggerMessage {answer.status}"
            async with asyncio.timeout(self.ocpp.call_timeout_s):
                return await future, ""
        except (OCPPError, NotSent, NoAnswer, TimeoutError) as exc:
            return None, f"not read back: {exc!r}"
        finally:
            future.cancel()

    # -- transaction messages ------------------------------------------------------------

    async def transaction_started(self, entity_id: str, id_tag: str) -> tuple[int, bool]:
        """A new transaction id for the charge point, and whether to accept it: the command
        whose idTag it carries succeeded, unless that command already ended otherwise (its
        deadline passed without a confirmation: dercmd said Failed), which refuses it."""
        transaction_id, command_id = await self.state.start_transaction(entity_id, id_tag)
        if command_id is None:
            return transaction_id, True
        [delivery] = await self.deliveries.peek_many([(entity_id, command_id)])
        if delivery.stage is Stage.DONE and delivery.outcome is not None and delivery.outcome.status is not CommandStatus.SUCCEEDED:
            metrics.LATE_TRANSACTIONS.inc()
            log.warning("late transaction refused", extra={"command_id": command_id, "entity_id": entity_id,
                                                           "transaction_id": transaction_id, "outcome": delivery.outcome.encode()})
            return transaction_id, False
        await self._confirmed(entity_id, command_id, transaction_id)
        return transaction_id, True

    async def transaction_stopped(self, entity_id: str, transaction_id: int) -> None:
        """The transaction ended; the command that asked for that succeeded."""
        command_id = await self.state.stop_transaction(entity_id, transaction_id)
        if command_id is not None:
            await self._confirmed(entity_id, command_id, transaction_id)

    async def _confirmed(self, entity_id: str, command_id: str, transaction_id: int) -> None:
        found = await self.state.confirm(entity_id, command_id, transaction_id)
        if found is None:
            return
        result = OcppResult(command_id=command_id, token=found.token, succeeded=True)
        self._spawn(self._report(found.result_url, result, entity_id), f"result {command_id}")

    async def _report(self, url: str, result: OcppResult, entity_id: str) -> None:
        """POST one result to dispatch, retried for about a minute (dispatch may be restarting;
        after that its delivery check reads the record)."""
        body = OcppResults(results=[result]).dump()
        for pause in (*_REPORT_BACKOFF_S, None):
            try:
                response = await self._http.post(url, content=body, headers={"content-type": "application/json"})
                if response.status_code < 500:
                    metrics.RESULTS.labels("posted" if response.status_code == 200 else "refused").inc()
                    if response.status_code != 200:
                        log.warning("result refused", extra={"command_id": result.command_id, "entity_id": entity_id,
                                                             "status": response.status_code, "body": response.text[:500]})
                    return
            except httpx.HTTPError:
                pass
            if pause is None:
                break
            await asyncio.sleep(pause)
        metrics.RESULTS.labels("failed").inc()
        log.warning("result not delivered to dispatch", extra={"command_id": result.command_id, "entity_id": entity_id})

    def describe(self) -> list[dict[str, Any]]:
        """The charge points connected here (``GET /internal/v1/charge-points``)."""
        return [
            {"chargePointId": cp, "entityId": c.entity.id, "booted": c.booted,
             "profiles": sorted(c.profiles) if c.profiles is not None else None,
             "connectors": {str(k): v for k, v in sorted(c.connectors.items())}}
            for cp, c in sorted(self.connections.items())
        ]

