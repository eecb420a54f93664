"""Backend ``sunspec-modbus``: PV inverters on SunSpec over Modbus TCP (see
:mod:`dercmd.protocols.sunspec`), one unit id per device behind a Modbus TCP server.

An entity's address is its ``vendorDeviceId`` when that is ``<unit>`` (on the default server,
``DERCMD_SUNSPEC_MODBUS_HOST``/``_PORT``, the simulator's when empty) or
``<host>:<port>/<unit>``; else the free unit ids of the default server in the order of the
fleet's sunspec-modbus entity ids, as the simulator assigns them.

A command is a few requests on one pooled connection: read the controls with model 123's
header (and dercmd's command tag), write the points the command needs (:mod:`.mapping`;
:meth:`~dercmd.protocols.sunspec.DeviceMap.writes`), read them back. Every read checks model
123's ``ID`` and ``L`` where the map says they are; when they differ (the device's layout
changed under a live connection) the device is discovered again before anything is written,
so nothing is ever written into a model that was not just verified. The read-back is the
confirmation (Confirmation.SYNC): the device holds the values and, where it has the tag model,
the command's id. Outcomes (reasons in brackets):

    not sent (no connection; any failure before the write; the first write answered busy;
    exception 0x04 at every base [unit_missing])
                                                 NotDelivered
    an exception answer to a write other than busy [write_refused], no such unit (0x0A)
    [unknown_device], no marker [not_sunspec], model 123 missing [no_controls_model] or
    truncated [controls_truncated], DER models 701-704 only [der_models_unsupported], a point
    the command needs not implemented [not_implemented], a command the registers cannot
    express, values not held after the write [not_applied]
                                                 Refused
    no answer to a write or to the read-back (timeout, dropped connection)
                                                 DeliveryUnknown

What became of a command (:meth:`SunSpecModbusBackend.outcomes`) is read from the device: the
tag naming it means SUCCEEDED, anything else UNKNOWN (it was never applied, or a later command
of dercmd's replaced it). A device without the tag model can be asked only with the order at
hand (it holds the order's values, or not). Deliveries to different units go concurrently (up
to ``DERCMD_SUNSPEC_MODBUS_CONNECTIONS`` per server); one unit's in order, one at a time.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from dercmd.events import CommandType, utcnow
from dercmd.fleet import Entity, EntityKind, Fleet
from dercmd.protocols import sunspec as ss
from dercmd.protocols.sunspec import SunSpecModbusSettings

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
from .mapping import Unmappable, controls_for, holds, points_for, tag_for

NAME = "sunspec-modbus"
#: Deliveries one call takes (each unit's in order, different units at once).
MAX_BATCH = 64
PV_TYPES = frozenset({CommandType.RESET, CommandType.DISCONNECT, CommandType.LIMIT_FEED_IN, CommandType.STOP_FEED_IN,
                      CommandType.LIMIT_PRODUCTION_POWER})
#: PV inverters, what SunSpec's controls (model 123) express.
CAPABILITIES = Capabilities(types=PV_TYPES, kinds=frozenset({EntityKind.PV}))
T = TypeVar("T")


class _Phase:
    """How far a delivery got, which decides what an error means."""

    BEFORE, WRITE, PARTLY, AFTER = "before", "write", "partly", "after"


class SunSpecModbusBackend:
    name = NAME
    supported_types = CAPABILITIES.types
    max_batch = MAX_BATCH
    router = None

    def __init__(self, fleet: Fleet, server: tuple[str, int], *, timeout_s: float = 2.0, connections: int = 8,
                 probe_timeout_s: float | None = None) -> None:
        self._server = server
        self._timeout_s, self._connections = timeout_s, connections
        self._probe_timeout_s = min(probe_timeout_s or timeout_s, timeout_s)
        entities = [e for e in fleet.entities.values() if e.backend == NAME]
        self._addresses = {entity_id: self._resolve(a) for entity_id, a in
                           ss.assign_units((e.id, e.vendor_device_id) for e in entities).items()}
        self._pools: dict[tuple[str, int], ss.ConnectionPool] = {}
        self._maps: dict[ss.Address, ss.DeviceMap] = {}

    def _resolve(self, address: ss.Address) -> ss.Address:
        return address if address.host else ss.Address(self._server[0], self._server[1], address.unit)

    def address(self, entity: Entity) -> ss.Address | None:
        if (known := self._addresses.get(entity.id)) is not None:
            return known
        parsed = ss.parse_address(entity.vendor_device_id)
        return self._resolve(parsed) if parsed is not None else None

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    # -- sending ---------------------------------------------------------------------

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]:
        return await self._per_unit([(d.entity, d) for d in deliveries], self._deliver)

    async def _deliver(self, address: ss.Address | None, d: Delivery) -> Accepted | BackendError:
        if address is None:
            return Refused("unknown_device", f"{d.entity.id} has no Modbus unit (vendorDeviceId or one of 247 free units)")
        phase = _Phase.BEFORE

        def written() -> None:
            nonlocal phase
            phase = _Phase.PARTLY

        try:
            async with self._pool(address).connection() as connection:
                client = ss.SunSpecClient(connection, address.unit, self._probe_timeout_s)
                device, _tag, current = await self._verified(client, address)
                target = controls_for(d.order, current, device, utcnow())
                points = points_for(d.order)
                tag = tag_for(d.order) if device.tagged else None
                phase = _Phase.WRITE
                await client.write(device.writes(tag, current, target, points), written)
                phase = _Phase.AFTER
                held_tag, held = await client.read_block(device)
        except Unmappable as exc:
            return Refused(exc.reason, exc.detail)
        except ss.SunSpecError as exc:
            self._maps.pop(address, None)
            return _translate(exc, phase)
        if not holds(target, held, points) or (tag is not None and held_tag != tag):
            return Refused("not_applied", f"unit {address.unit} holds {held} {held_tag or ''} after writing {target} {tag or ''}")
        return Accepted(Confirmation.SYNC)

    # -- asking ----------------------------------------------------------------------

    async def outcomes(self, queries: Sequence[Query]) -> list[CommandOutcome]:
        answers = await self._per_unit([(q.entity, q) for q in queries], self._outcome)
        for answer in answers:
            if isinstance(answer, BackendError):
                raise answer
        return [a for a in answers if isinstance(a, CommandOutcome)]

    async def _outcome(self, address: ss.Address | None, q: Query) -> CommandOutcome | BackendError:
        if address is None:
            return CommandOutcome(Finding.UNKNOWN, f"{q.entity.id} has no Modbus unit")
        try:
            async with self._pool(address).connection() as connection:
                client = ss.SunSpecClient(connection, address.unit, self._probe_timeout_s)
                device, tag, held = await self._verified(client, address)
                if tag is None:
                    if q.order is None:
                        return Refused("cannot_tell", f"unit {address.unit} has no command tag (model {ss.TAG}) and the order is not at hand")
                    target = controls_for(q.order, held, device, q.order.ordered_at)
                    found = holds(target, held, points_for(q.order))
                else:
                    found = tag.command_id == q.command_id
        except Unmappable:
            return CommandOutcome(Finding.UNKNOWN, "the order cannot be expressed in this device's registers")
        except ss.SunSpecError as exc:
            self._maps.pop(address, None)
            return NotDelivered("backend_unavailable", f"asking unit {address.unit}: {exc}")
        if found:
            return CommandOutcome(Finding.SUCCEEDED)
        return CommandOutcome(Finding.UNKNOWN, f"unit {address.unit} holds command {tag.command_id!r}" if tag else "values not held")

    # -- plumbing --------------------------------------------------------------------

    async def _per_unit(self, items: Sequence[tuple[Entity, T]],
                        act: Callable[[ss.Address | None, T], Awaitable[Accepted | CommandOutcome | BackendError]]
                        ) -> list[Accepted | CommandOutcome | BackendError]:
        """``act`` on every item, one unit's in order and different units' at once; answers in
        the items' order."""
        by_unit: dict[ss.Address | None, list[int]] = defaultdict(list)
        for i, (entity, _) in enumerate(items):
            by_unit[self.address(entity)].append(i)
        answers: list[Accepted | CommandOutcome | BackendError | None] = [None] * len(items)

        async def one_unit(address: ss.Address | None, positions: list[int]) -> None:
            for i in positions:
                answers[i] = await act(address, items[i][1])

        await asyncio.gather(*(one_unit(a, p) for a, p in by_unit.items()))
        return [a for a in answers if a is not None]

    def _pool(self, address: ss.Address) -> ss.ConnectionPool:
        key = (address.host, address.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ss.ConnectionPool(address.host, address.port, self._timeout_s, self._connections)
        return pool

    async def _verified(self, client: ss.SunSpecClient,
                        address: ss.Address) -> tuple[ss.DeviceMap, ss.CommandTag | None, ss.Controls]:
        """The device's model map (discovered once, kept until an error on that unit or a
        layout change) and what its block holds, read with model 123's header and checked
        against the map: when the header moved, or the block is no longer there (0x02), the
        device is discovered again (its old base tried first) and read anew."""
        device = self._maps.get(address)
        if device is not None:
            try:
                return device, *await client.read_block(device)
            except (ss.LayoutChanged, ss.ExceptionAnswer) as exc:
                if isinstance(exc, ss.ExceptionAnswer) and exc.code != ss.ILLEGAL_ADDRESS:
                    raise
                self._maps.pop(address, None)
        device = self._maps[address] = await client.discover(device.base if device is not None else None)
        return device, *await client.read_block(device)


def _translate(error: ss.SunSpecError, phase: str) -> BackendError:
    detail = str(error)
    if phase == _Phase.AFTER or (phase in (_Phase.WRITE, _Phase.PARTLY) and isinstance(error, ss.NoAnswer)):
        return DeliveryUnknown("delivery_unknown", detail)
    if phase == _Phase.PARTLY:  # an exception answer after the first write went through
        return Refused("write_refused", f"partly written: {detail}")
    if isinstance(error, ss.ExceptionAnswer):
        if error.busy:
            return NotDelivered("backend_unavailable", detail)
        if error.code == ss.GATEWAY_PATH_UNAVAILABLE:
            return Refused("unknown_device", detail)
        return Refused("write_refused" if phase == _Phase.WRITE else "backend_refused", detail)
    if isinstance(error, ss.NotSunSpec):
        return Refused(error.reason, detail)
    if isinstance(error, ss.UnitMissing):
        return NotDelivered(error.reason, detail)
    return NotDelivered("backend_unavailable", detail)  # Unreachable, or no answer before the write


@register(NAME, SunSpecModbusSettings, CAPABILITIES)
def _create(context: BackendContext) -> SunSpecModbusBackend:
    settings = SunSpecModbusSettings()
    return SunSpecModbusBackend(context.fleet, settings.server(context.settings), timeout_s=settings.timeout_s,
                                connections=settings.connections, probe_timeout_s=settings.probe_timeout_s)
