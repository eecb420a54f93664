"""Simulated OCPP 1.6J charge points: one for every fleet entity on the ``ocpp`` backend, each
holding a WebSocket to the OCPP gateway (``ws://<gateway>/ocpp/<device id>``).

A charge point connects (again and again, with backoff and jitter, while the gateway is down
or restarting: the launcher starts the simulator before the gateway), boots, reports its
connector ``Available``, heartbeats at the interval the gateway gave, and answers:

- ``GetConfiguration(SupportedFeatureProfiles)``: the profiles its fleet entry declares
  (:func:`dercmd.protocols.ocpp.profiles_of`: StartCharging / StopCharging declared -> Core;
  ``declaredTypes: []`` declares nothing; no ``declaredTypes`` at all: Core), and
  RemoteTrigger beside Core;
- ``RemoteStartTransaction``: ``Accepted``, then a StartTransaction with the idTag
  ``confirm_delay_s`` later (a transaction already running is stopped first, reason Other: the
  newest command wins, as dercmd's slot rules have it);
- ``RemoteStopTransaction``: ``Accepted`` for the running transaction, then its
  StopTransaction; ``Rejected`` when none runs or for another transaction;
- ``TriggerMessage(StatusNotification)``: ``Accepted``, then connector 1's status (Charging
  from an accepted start until its stop, else Available), whether or not the transaction
  messages got through.

Transaction messages (and triggered status) wait in an outbox, in order, until the gateway
has answered them: one that could not be sent goes after the next boot (as OCPP asks of a
charge point offline). A StopTransaction takes its transaction id when it is sent (its start's
answer is in by then).

Each command the charge point acted on is recorded once, under the command's id. Every CALL
has a message id of its own (:func:`dercmd.protocols.ocpp.new_message_id`), so the simulator
learns the command the way a real charge point never needs to: from the gateway's record in
Redis (:meth:`dercmd.state.ocpp.OcppState.command_of_tag` for a start's idTag,
:meth:`~dercmd.state.ocpp.OcppState.command_of_stop` for a stop's transaction id). Without
that record (no Redis given, or none written: a call made by hand) it is recorded under the
message id.

The fault plans (:mod:`..faults`) apply to RemoteStart/RemoteStop, in OCPP's terms:

    latency            acts, answers ``latencyMs`` late
    5xx                CALLERROR InternalError, does not act
    429                CALLERROR GenericError with ``{"retryAfterS": ...}`` in its details (OCPP
                       1.6 has no rate-limit code), does not act
    timeout_after_act  acts (its transaction message goes out), answers ``hangS`` late
    drop_connection    acts, closes the WebSocket without answering; its transaction message
                       goes out after it reconnected and booted
    lose_callback      acts and answers Accepted; its transaction message never goes out (the
                       charge point forgets the transaction)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import websockets
import yaml
from fastapi import APIRouter
from ocpp.exceptions import GenericError, InternalError, OCPPError
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import (
    Action,
    ChargePointErrorCode,
    ChargePointStatus,
    MessageTrigger,
    Reason,
    RemoteStartStopStatus,
    TriggerMessageStatus,
)
from websockets.typing import Subprotocol

from dercmd.events import CommandType, utcnow
from dercmd.fleet import Entity, Fleet
from dercmd.protocols.ocpp import (
    CONNECTOR_ID,
    REMOTE_TRIGGER,
    SUBPROTOCOL,
    SUPPORTED_FEATURE_PROFILES,
    WS_PATH,
    OcppSettings,
    basic_authorization,
    profiles_of,
)
from dercmd.settings import SimulatorSettings
from dercmd.state.ocpp import OcppState

from .. import metrics
from ..faults import Fault, FaultKind, Faults
from ..recorder import Recorder
from ..registry import SimContext, simulates

log = logging.getLogger(__name__)
logging.getLogger("ocpp").setLevel(logging.WARNING)

NAME = "ocpp"
#: How long a charge point waits for the gateway's answer to its own CALL.
RESPONSE_TIMEOUT_S = 10.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0


def gateway_ws_url(settings: SimulatorSettings, ocpp: OcppSettings) -> str:
    """Where the charge points connect: the gateway's own URL, as a WebSocket URL."""
    base = ocpp.own_url(settings)
    return "ws" + base.removeprefix("http") + WS_PATH


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Link(ChargePoint):
    """The charge point's side of one connection: what it answers the central system."""

    def __init__(self, sim: SimChargePoint, connection: Any) -> None:
        super().__init__(sim.entity.device_id, connection, response_timeout=RESPONSE_TIMEOUT_S)
        self.sim = sim
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Read until the connection closes; each CALL is handled in a task of its own, so an
        answer held back (a fault) does not hold back the answers to the charge point's own
        CALLs."""
        while True:
            message = await self._connection.recv()
            if json.loads(message)[0] == 2:
                task = asyncio.ensure_future(self._handle(message))
                self.handlers.add(task)
                task.add_done_callback(self.handlers.discard)
            else:
                await self.route_message(message)

    async def _handle(self, message: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.route_message(message)

    @on(Action.get_configuration)
    async def on_get_configuration(self, key: list[str] | None = None, **_: Any) -> Any:
        if key is not None and SUPPORTED_FEATURE_PROFILES not in key:
            return call_result.GetConfiguration(configuration_key=[], unknown_key=list(key))
        value = ",".join(self.sim.profiles)
        return call_result.GetConfiguration(configuration_key=[{"key": SUPPORTED_FEATURE_PROFILES, "readonly": True, "value": value}])

    @on(Action.remote_start_transaction)
    async def on_remote_start(self, id_tag: str, call_unique_id: str, connector_id: int | None = None, **_: Any) -> Any:
        return await self.sim.remote_start(self, id_tag, connector_id or CONNECTOR_ID, call_unique_id)

    @on(Action.remote_stop_transaction)
    async def on_remote_stop(self, transaction_id: int, call_unique_id: str, **_: Any) -> Any:
        return await self.sim.remote_stop(self, transaction_id, call_unique_id)

    @on(Action.trigger_message)
    async def on_trigger_message(self, requested_message: str, connector_id: int | None = None, **_: Any) -> Any:
        if requested_message != MessageTrigger.status_notification:
            return call_result.TriggerMessage(status=TriggerMessageStatus.not_implemented)
        self.sim.send_later(("status",))
        return call_result.TriggerMessage(status=TriggerMessageStatus.accepted)


class SimChargePoint:
    def __init__(self, entity: Entity, url: str, recorder: Recorder, faults: Faults, confirm_delay_s: float,
                 password: str | None = None, commands: OcppState | None = None) -> None:
        self.entity = entity
        #: Where it looks up which command a call carries (the gateway's records); None: nowhere.
        self.commands = commands
        self.url = f"{url}/{entity.device_id}"
        #: Its AuthorizationKey (OCPP 1.6 security profile 1): sent as HTTP Basic when it connects.
        self.password = password
        self.recorder = recorder
        self.faults = faults
        self.confirm_delay_s = confirm_delay_s
        declared = profiles_of(entity.declared_types)
        self.profiles = declared + [REMOTE_TRIGGER] if "Core" in declared else declared
        self.connected = asyncio.Event()
        self.charging = False  # connector 1, as the charge point itself knows it
        self.transaction: int | None = None  # the running transaction's id, as the gateway gave it
        self.ended: set[int] = set()  # transactions whose StopTransaction is on its way (or lost)
        self.meter_wh = 0
        #: ("start", idTag) | ("stop", transaction id or None: the running one, Reason) | ("status",)
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._wake = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()

    # -- the connection ------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected: reconnect with backoff (and jitter, so a fleet does not come back
        all at once) whenever the connection fails or closes."""
        pause = RECONNECT_MIN_S
        while True:
            try:
                headers = {"Authorization": basic_authorization(self.entity.device_id, self.password)} if self.password else None
                async with websockets.connect(self.url, subprotocols=[Subprotocol(SUBPROTOCOL)], open_timeout=5,
                                              ping_interval=20, ping_timeout=20, additional_headers=headers) as connection:
                    pause = RECONNECT_MIN_S
                    await self._session(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, reset, closed: try again
                log.debug("charge point connection ended", extra={"entity_id": self.entity.id, "error": repr(exc)})
            finally:
                self.connected.clear()
            await asyncio.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 2, RECONNECT_MAX_S)

    async def _session(self, connection: Any) -> None:
        link = _Link(self, connection)
        reader = asyncio.ensure_future(link.start())
        try:
            boot = await self._call(link, reader, call.BootNotification(
                charge_point_model="dercmd-sim", charge_point_vendor=self.entity.vendor[:20]))
            interval = max(1, int(boot.interval))
            await self._call(link, reader, self._status())
            self.connected.set()
            while True:
                await self._flush(link, reader)
                self._wake.clear()
                waking = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((waking, reader), timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waking.cancel()
                if reader.done():
                    reader.result()  # raises what closed it
                    return
                if not self._wake.is_set():
                    await self._call(link, reader, call.Heartbeat())
        finally:
            reader.cancel()
            for task in list(link.handlers):
                task.cancel()
            await asyncio.gather(reader, *link.handlers, return_exceptions=True)

    async def _call(self, link: _Link, reader: asyncio.Future[None], payload: Any) -> Any:
        """A CALL to the gateway; fails as soon as the connection closes."""
        calling = asyncio.ensure_future(link.call(payload, suppress=False))
        await asyncio.wait((calling, reader), return_when=asyncio.FIRST_COMPLETED)
        if not calling.done():
            calling.cancel()
            raise ConnectionError("connection closed during a call")
        return calling.result()

    def _status(self) -> Any:
        status = ChargePointStatus.charging if self.charging else ChargePointStatus.available
        return call.StatusNotification(connector_id=CONNECTOR_ID, error_code=ChargePointErrorCode.no_error, status=status,
                                       timestamp=_now())

    def _message(self, item: tuple[Any, ...]) -> Any:
        """The CALL an outbox entry is now (None: nothing left to say)."""
        if item[0] == "start":
            return call.StartTransaction(connector_id=CONNECTOR_ID, id_tag=item[1], meter_start=self.meter_wh, timestamp=_now())
        if item[0] == "stop":
            transaction = item[1]
            if transaction is None:  # the running one: its start's answer came in meanwhile
                transaction = self.transaction if self.transaction not in self.ended else None
                if transaction is None:
                    return None  # its start was never told (lost): neither is its stop
                self.ended.add(transaction)
            return call.StopTransaction(meter_stop=self.meter_wh, timestamp=_now(), transaction_id=transaction, reason=item[2])
        return self._status()

    async def _flush(self, link: _Link, reader: asyncio.Future[None]) -> None:
        """Send what waits in the outbox, in order; each entry leaves once answered."""
        while self._outbox:
            message = self._message(self._outbox[0])
            if message is None:
                self._outbox.popleft()
                continue
            try:
                answer = await self._call(link, reader, message)
            except OCPPError as exc:  # the gateway could not take it now: again in a moment
                log.warning("transaction message refused", extra={"entity_id": self.entity.id, "error": repr(exc)})
                await asyncio.sleep(1.0)
                continue
            self._outbox.popleft()
            if isinstance(message, call.StartTransaction):
                self.transaction = int(answer.transaction_id)
            elif isinstance(message, call.StopTransaction) and self.transaction == message.transaction_id:
                self.transaction = None

    def send_later(self, item: tuple[Any, ...]) -> None:
        def put() -> None:
            self._timers.discard(handle)
            self._outbox.append(item)
            self._wake.set()

        handle = asyncio.get_running_loop().call_later(self.confirm_delay_s, put)
        self._timers.add(handle)

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()

    # -- commands ------------------------------------------------------------------------

    async def remote_start(self, link: _Link, id_tag: str, connector_id: int, message_id: str) -> Any:
        fault = self._draw()
        if fault is not None and fault.kind is FaultKind.LATENCY:
            await asyncio.sleep(fault.latency_s)
        command_id = await self._command_of(message_id, id_tag=id_tag)
        self._record(command_id, CommandType.START_CHARGING)
        messages: list[tuple[Any, ...]] = []
        if self.charging:  # the newest command wins: the running transaction ends first
            messages.append(("stop", self._end(), Reason.other))
        self.charging = True
        self.meter_wh += 1000
        messages.append(("start", id_tag))
        return await self._acted(link, fault, messages, call_result.RemoteStartTransaction(status=RemoteStartStopStatus.accepted))

    async def remote_stop(self, link: _Link, transaction_id: int, message_id: str) -> Any:
        fault = self._draw()
        if not self.charging or transaction_id != self.transaction or transaction_id in self.ended:
            return call_result.RemoteStopTransaction(status=RemoteStartStopStatus.rejected)
        if fault is not None and fault.kind is FaultKind.LATENCY:
            await asyncio.sleep(fault.latency_s)
        command_id = await self._command_of(message_id, transaction_id=transaction_id)
        self._record(command_id, CommandType.STOP_CHARGING)
        self.charging = False
        self.meter_wh += 1000
        messages = [("stop", self._end(), Reason.remote)]
        return await self._acted(link, fault, messages, call_result.RemoteStopTransaction(status=RemoteStartStopStatus.accepted))

    def _end(self) -> int | None:
        """The running transaction ends (its id, None while its start is unanswered)."""
        if self.transaction is not None:
            self.ended.add(self.transaction)
        return self.transaction

    def _draw(self) -> Fault | None:
        """The call's fault; one that comes before acting is raised as the CALLERROR."""
        fault = self.faults.draw(self.entity.id)
        if fault is not None and fault.kind is FaultKind.ERROR_5XX:
            raise InternalError(description="simulated internal error")
        if fault is not None and fault.kind is FaultKind.RATE_LIMITED:
            raise GenericError(description="rate limited", details={"retryAfterS": fault.retry_after_s})
        return fault

    async def _command_of(self, message_id: str, *, id_tag: str | None = None, transaction_id: int | None = None) -> str:
        """The command a call carries, as the gateway recorded it before sending (a start by its
        idTag, a stop by its transaction id); the call's message id where there is no record."""
        if self.commands is None:
            return message_id
        try:
            if id_tag is not None:
                found = await self.commands.command_of_tag(self.entity.id, id_tag)
            else:
                assert transaction_id is not None
                found = await self.commands.command_of_stop(self.entity.id, transaction_id)
        except Exception as exc:  # Redis away: the receipt is kept, under the message id
            log.warning("command of a call not found", extra={"entity_id": self.entity.id, "error": repr(exc)})
            return message_id
        return found or message_id

    def _record(self, command_id: str, type: CommandType) -> None:
        metrics.RECEIVED.labels(NAME).inc()
        self.recorder.record(self.entity.id, NAME, command_id, type.value, None, utcnow())

    async def _acted(self, link: _Link, fault: Fault | None, messages: list[tuple[Any, ...]], answer: Any) -> Any:
        """The charge point acted: its transaction messages follow (unless lost), and the
        answer comes as the fault has it."""
        kind = fault.kind if fault is not None else None
        if kind is FaultKind.LOSE_CALLBACK:
            return answer
        if kind is FaultKind.DROP_CONNECTION:
            self._outbox.extend(messages)  # sent after the next boot
            await link._connection.close()
            await asyncio.Event().wait()  # never answers; cancelled with the session
        for message in messages:
            self.send_later(message)
        if kind is FaultKind.TIMEOUT_AFTER_ACT:
            assert fault is not None
            await asyncio.sleep(fault.hang_s)
        return answer


class OcppChargePoints:
    """Every simulated charge point of the fleet, each connected on its own task."""

    def __init__(self, fleet: Fleet, recorder: Recorder, faults: Faults, url: str, confirm_delay_s: float,
                 passwords: Mapping[str, str] | None = None, redis: aioredis.Redis | None = None,
                 owns_redis: bool = False) -> None:
        """``passwords``: each charge point's AuthorizationKey, by its id (those the fleet
        requires one of connect with it); ``redis``: where the gateway records its commands
        (the simulator reads which command each call carries there; closed with this object
        when ``owns_redis``)."""
        commands = OcppState(redis) if redis is not None else None
        self._redis = redis if owns_redis else None
        self.by_entity = {
            e.id: SimChargePoint(e, url, recorder, faults, confirm_delay_s, (passwords or {}).get(e.device_id), commands)
            for e in fleet.entities.values() if e.backend == NAME
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.router = APIRouter()  # the charge points call out; nothing is served

    def start(self) -> None:
        self._tasks = {entity_id: asyncio.ensure_future(cp.run()) for entity_id, cp in self.by_entity.items()}

    async def stop(self, entity_id: str) -> None:
        """Switch one charge point off (tests): its connection closes, it stays away."""
        task = self._tasks.pop(entity_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.by_entity[entity_id].close()

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for cp in self.by_entity.values():
            cp.close()
        if self._redis is not None:
            await self._redis.aclose()

    def connected(self) -> Awaitable[Any]:
        """Done once every charge point has booted on a connection (tests)."""
        return asyncio.gather(*(cp.connected.wait() for cp in self.by_entity.values()))


@simulates(NAME, state="charge_points")
def _create(context: SimContext) -> OcppChargePoints:
    return OcppChargePoints(context.fleet, context.recorder, context.faults, gateway_ws_url(context.settings, OcppSettings()),
                            context.settings.sim_confirm_delay_ms / 1000, passwords(context.settings.sim_ocpp_passwords_file),
                            redis=aioredis.from_url(context.settings.redis_url), owns_redis=True)


def passwords(path: str) -> dict[str, str]:
    """The simulated charge points' passwords (``chargePointId: password`` in YAML), as each
    real charge point is provisioned with its own; none where the file is empty or absent."""
    if not path or not Path(path).is_file():
        return {}
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    return {str(k): str(v) for k, v in loaded.items()}
