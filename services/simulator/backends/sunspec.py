"""Simulated SunSpec inverters on Modbus TCP (see :mod:`dercmd.protocols.sunspec`): one server on
``DERCMD_SIM_MODBUS_PORT`` answers for every fleet entity whose backend is ``sunspec-modbus``,
each as its own unit id (its ``vendorDeviceId`` when that is a unit number, else the free unit
ids in the order of the entity ids: :func:`~dercmd.protocols.sunspec.assign_units`, which the
dispatch backend computes the same way). An entity whose ``vendorDeviceId`` names another
server (``host:port/unit``) is not served here.

Each unit holds, from 40000: the marker, common model 1, inverter model 103 (``W`` follows the
device's measurements), nameplate 120 (``WRtg`` = 5 kW per inverter), dercmd's command tag
64990 and immediate controls 123 (``WMaxLimPct_SF`` = -1), then the end model. Every point a
unit does not use holds its type's not-implemented value (0xFFFF for uint16 and enum16, 0x8000
for int16 and sunssf, 0 for accumulators and strings), as the SunSpec models define them, so a
reader (pysunspec2 among them) sees it as not implemented rather than as 0. Reads and writes
are function codes 3, 6 and 16; a write may touch the tag and the first 21 points of model 123,
and rewrite the models' headers with the values they hold; anything else is refused
(0x02 illegal address, 0x03 illegal value). A unit no entity has answers 0x0A (no path to it).

What a write leaves in the controls is reflected into the device's :class:`~..devices.SimDevice`
(``/sim/devices/{id}/state``): ``WMaxLim_Ena`` = 1 limits production to ``WMaxLimPct`` (with its
scale factor: 246 is 24.6 %, not 24 %), until
``WMaxLimPct_RvrtTms`` seconds after the limit was written, when the device drops it by itself
(``WMaxLim_Ena`` reads 0 again); ``Conn`` = 0 disconnects. ``Conn``'s own timers are held, not
acted on. A write that puts a new command id into the tag is that command's receipt, recorded
once; a write without a new tag changes the device but is no command.

Fault plans (:mod:`..faults`) are drawn once per write request, the request that carries a
command; reads always answer. ``5xx`` and ``429``: exception 0x06 (device busy) before acting
(Modbus has no Retry-After); ``latency``: acts, answers late; ``timeout_after_act``: acts,
answers after ``hangS``; ``drop_connection``: acts, closes the connection unanswered;
``lose_callback``: nothing to lose (the answer is the confirmation), so the write goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from datetime import timedelta

from fastapi import APIRouter

from dercmd.events import CommandType, utcnow
from dercmd.fleet import Entity, Fleet
from dercmd.protocols import sunspec as ss

from .. import metrics
from ..devices import NOMINAL_W, SimDevice, measures
from ..faults import FaultKind, Faults
from ..recorder import Recorder
from ..registry import SimContext, simulates


BACKEND = "sunspec-modbus"
BASE = 40000
PCT_SF = -1
INVERTER, INVERTER_LENGTH = 103, 50
W_OFFSET = 12  # W, then W_SF, in model 103's body
#: The models of a simulated unit, in chain order: (id, length).
LAYOUT = ((ss.COMMON, ss.COMMON_LENGTH), (INVERTER, INVERTER_LENGTH), (ss.NAMEPLATE, ss.NAMEPLATE_LENGTH),
          (ss.TAG, ss.TAG_LENGTH), (ss.CONTROLS, ss.CONTROLS_LENGTH))
#: Writable points of model 123: Conn_WinTms .. VArPct_Ena (the scale factors are not).
CONTROLS_WRITABLE = 21
#: The point types of each model's body, one letter a register (from the SunSpec model
#: definitions): ``u`` uint16, enum16 or a word of a uint32 or bitfield32 (not implemented:
#: 0xFFFF), ``s`` int16, sunssf or pad (0x8000), ``z`` acc32 or string (0).
TYPES = {
    ss.COMMON: "z" * 64 + "us",
    INVERTER: "uuuusuuuuuusssussssssszzsusussssssssuuuuuuuuuuuuuu",
    ss.NAMEPLATE: "uusussssssussssssususususs",
    ss.CONTROLS: "uuuuuuuusuuuusssuuuuusss",
}
_NOT_IMPLEMENTED = {"u": 0xFFFF, "s": 0x8000, "z": 0}
_MBAP = struct.Struct(">HHHB")


def _models() -> dict[int, ss.Model]:
    out: dict[int, ss.Model] = {}
    address = BASE + 2
    for model_id, length in LAYOUT:
        out[model_id] = ss.Model(model_id, address, length)
        address += 2 + length
    return out


MODELS = _models()
END_ADDRESS = MODELS[ss.CONTROLS].end
SIZE = END_ADDRESS + 2 - BASE


class SunSpecUnit:
    """One simulated inverter's registers and what they mean to its device."""

    def __init__(self, entity: Entity, unit: int, device: SimDevice | None) -> None:
        self.entity, self.unit, self.device = entity, unit, device
        self.registers = [0] * SIZE
        self.revert_at: float | None = None  # loop time at which the device drops its limit
        self._put(BASE, list(ss.MARKER))
        for model in MODELS.values():
            self._put(model.address, [model.id, model.length])
            if (types := TYPES.get(model.id)) is not None:
                self._put(model.body, [_NOT_IMPLEMENTED[t] for t in types])
        self._put(END_ADDRESS, [ss.END, 0])
        common = MODELS[ss.COMMON].body
        self._put(common, ss.encode_string(entity.vendor, 16) + ss.encode_string("dercmd-sim-inverter", 16)
                  + ss.encode_string("", 8) + ss.encode_string("1.0", 8) + ss.encode_string(entity.id, 16) + [unit, 0x8000])
        units = len(device.units) if device is not None else 1
        rated_w, rated_sf = units * NOMINAL_W, 0
        while rated_w > 0xFFFE:
            rated_w, rated_sf = rated_w // 10, rated_sf + 1
        self._put(MODELS[ss.NAMEPLATE].body, [4, rated_w, rated_sf])
        self._put(MODELS[INVERTER].body + W_OFFSET, [0, 0])  # W, W_SF
        self._put(MODELS[ss.TAG].body, ss.CommandTag().registers())
        controls = MODELS[ss.CONTROLS].body
        self._put(controls, ss.Controls(conn=1, wmaxlim_pct=100 * 10**-PCT_SF, wmaxlim_ena=0).registers())
        self._put(controls + ss.PCT_SF_OFFSET, [ss.unsigned(PCT_SF), ss.unsigned(-3), 0])

    def _put(self, address: int, values: list[int]) -> None:
        self.registers[address - BASE : address - BASE + len(values)] = values

    def _get(self, address: int, count: int) -> list[int]:
        return self.registers[address - BASE : address - BASE + count]

    @property
    def controls(self) -> ss.Controls:
        return ss.Controls.of(self._get(MODELS[ss.CONTROLS].body, ss.CONTROL_POINTS))

    @property
    def tag(self) -> ss.CommandTag:
        return ss.CommandTag.of(self._get(MODELS[ss.TAG].body, ss.TAG_LENGTH))

    def read(self, address: int, count: int, now: float) -> list[int] | int:
        """The registers, or the exception code."""
        if address < BASE or address + count > BASE + SIZE or not 1 <= count <= ss.MAX_READ:
            return ss.ILLEGAL_ADDRESS
        self.expire(now)
        if self.device is not None:
            watts = self.device.measurements(utcnow())["activePowerW"]
            self._put(MODELS[INVERTER].body + W_OFFSET, [min(watts, 0x7FFF)])
        return self._get(address, count)

    def refusal(self, address: int, values: list[int]) -> int | None:
        """Why a write is refused (its exception code), or None."""
        tag, controls = MODELS[ss.TAG], MODELS[ss.CONTROLS]
        for i, value in enumerate(values):
            at = address + i
            if tag.body <= at < tag.end or controls.body <= at < controls.body + CONTROLS_WRITABLE:
                continue
            if at in (tag.address, tag.address + 1, controls.address, controls.address + 1) and self._get(at, 1) == [value]:
                continue  # a header rewritten with what it holds
            return ss.ILLEGAL_ADDRESS
        after = list(self._get(controls.body, ss.CONTROL_POINTS))
        for i, value in enumerate(values):
            if controls.body <= address + i < controls.body + ss.CONTROL_POINTS:
                after[address + i - controls.body] = value
        c = ss.Controls.of(after)
        if c.conn not in (0, 1) or c.wmaxlim_ena not in (0, 1) or c.wmaxlim_pct > 100 * 10**-PCT_SF:
            return ss.ILLEGAL_VALUE
        return None

    def write(self, address: int, values: list[int], now: float) -> ss.CommandTag | None:
        """Take a write (checked by :meth:`refusal`); the tag when it names a new command."""
        self.expire(now)
        before_tag, before = self.tag, self.controls
        self._put(address, values)
        after = self.controls
        limit = (after.wmaxlim_pct, after.wmaxlim_pct_rvrt_tms, after.wmaxlim_ena)
        if limit != (before.wmaxlim_pct, before.wmaxlim_pct_rvrt_tms, before.wmaxlim_ena):
            self.revert_at = now + after.wmaxlim_pct_rvrt_tms if after.wmaxlim_ena and after.wmaxlim_pct_rvrt_tms else None
        self.reflect(now)
        tag = self.tag
        return tag if tag.command_id and tag.command_id != before_tag.command_id else None

    def expire(self, now: float) -> None:
        """The device's own revert timer: past it, the limit is dropped."""
        if self.revert_at is not None and now >= self.revert_at:
            self.revert_at = None
            self._put(MODELS[ss.CONTROLS].body + 7, [0])  # WMaxLim_Ena
            self.reflect(now)

    def reflect(self, now: float) -> None:
        if self.device is None:
            return
        c = self.controls
        self.device.apply(CommandType.RESET, None, None)
        if c.wmaxlim_ena:
            end_at = utcnow() + timedelta(seconds=self.revert_at - now) if self.revert_at is not None else None
            percentage = held_percentage(c.wmaxlim_pct)
            self.device.apply(CommandType.LIMIT_PRODUCTION_POWER, None, percentage, end_at=end_at)
        if c.conn == 0:
            self.device.apply(CommandType.DISCONNECT, None, None)


class SunSpecSim:
    """The Modbus TCP server in front of every simulated SunSpec unit."""

    name = BACKEND

    def __init__(self, fleet: Fleet, recorder: Recorder, faults: Faults, host: str, port: int) -> None:
        entities = [e for e in fleet.entities.values() if e.backend == BACKEND]
        addresses = ss.assign_units((e.id, e.vendor_device_id) for e in entities)
        self.units: dict[int, SunSpecUnit] = {}
        for entity in entities:
            address = addresses.get(entity.id)
            if address is not None and not address.host:
                self.units[address.unit] = SunSpecUnit(entity, address.unit, SimDevice(entity) if measures(entity) else None)
        self.by_entity: dict[str, SimDevice] = {u.entity.id: u.device for u in self.units.values() if u.device is not None}
        self.recorder, self.faults = recorder, faults
        self.host, self.port = host, port
        self.router = APIRouter()
        self.received = metrics.RECEIVED.labels(BACKEND)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen, if the fleet has SunSpec inverters (else the port stays free)."""
        if self.units:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                header = await reader.readexactly(_MBAP.size)
                transaction, protocol, length, unit = _MBAP.unpack(header)
                pdu = await reader.readexactly(length - 1)
                if protocol != 0 or not pdu:
                    break
                answer = await self._answer(unit, pdu, writer)
                if answer is None:
                    break
                writer.write(_MBAP.pack(transaction, 0, len(answer) + 1, unit) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _answer(self, unit_id: int, pdu: bytes, writer: asyncio.StreamWriter) -> bytes | None:
        """The response PDU, or None to close the connection without one."""
        function = pdu[0]
        unit = self.units.get(unit_id)
        if unit is None:
            return _exception(function, ss.GATEWAY_PATH_UNAVAILABLE)
        now = asyncio.get_running_loop().time()
        if function == 3 and len(pdu) == 5:
            address, count = struct.unpack(">HH", pdu[1:5])
            registers = unit.read(address, count, now)
            if isinstance(registers, int):
                return _exception(function, registers)
            return bytes([3, 2 * count]) + struct.pack(f">{count}H", *registers)
        if function == 6 and len(pdu) == 5:
            address, value = struct.unpack(">HH", pdu[1:5])
            return await self._write(unit, function, address, [value], pdu[:5], writer)
        if function == 16 and len(pdu) >= 6:
            address, count, size = *struct.unpack(">HH", pdu[1:5]), pdu[5]
            if size != 2 * count or len(pdu) != 6 + size or not 1 <= count <= 123:
                return _exception(function, ss.ILLEGAL_VALUE)
            values = list(struct.unpack(f">{count}H", pdu[6:]))
            return await self._write(unit, function, address, values, pdu[:5], writer)
        return _exception(function, ss.ILLEGAL_FUNCTION)

    async def _write(self, unit: SunSpecUnit, function: int, address: int, values: list[int], echo: bytes,
                     writer: asyncio.StreamWriter) -> bytes | None:
        fault = self.faults.draw(unit.entity.id)
        if fault is not None and fault.kind in (FaultKind.ERROR_5XX, FaultKind.RATE_LIMITED):
            return _exception(function, ss.DEVICE_BUSY)
        if (code := unit.refusal(address, values)) is not None:
            return _exception(function, code)
        tag = unit.write(address, values, asyncio.get_running_loop().time())
        if tag is not None:
            self._record(unit, tag)
        if fault is None or fault.kind is FaultKind.LOSE_CALLBACK:
            return echo
        if fault.kind is FaultKind.LATENCY:
            await asyncio.sleep(fault.latency_s)
        elif fault.kind is FaultKind.TIMEOUT_AFTER_ACT:
            await asyncio.sleep(fault.hang_s)
        elif fault.kind is FaultKind.DROP_CONNECTION:
            writer.transport.abort()
            return None
        return echo

    def _record(self, unit: SunSpecUnit, tag: ss.CommandTag) -> None:
        c = unit.controls
        percentage = tag.value if tag.type == CommandType.LIMIT_PRODUCTION_POWER else None
        value = tag.value if tag.type == CommandType.LIMIT_FEED_IN else None
        end_at = None
        if c.wmaxlim_ena and c.wmaxlim_pct_rvrt_tms and unit.revert_at is not None:
            end_at = utcnow() + timedelta(seconds=c.wmaxlim_pct_rvrt_tms)
        self.recorder.record(unit.entity.id, BACKEND, tag.command_id, tag.type or "", value, utcnow(),
                             percentage=percentage, end_at=end_at)
        self.received.inc()


def held_percentage(register: int) -> int | float:
    """``WMaxLimPct`` as the device holds it, its scale factor applied (a whole number as int)."""
    percentage = round(ss.scaled(register, PCT_SF), -PCT_SF)
    return int(percentage) if percentage == int(percentage) else percentage


def _exception(function: int, code: int) -> bytes:
    return bytes([function | 0x80, code])


@simulates(BACKEND, state="sunspec")
def _create(context: SimContext) -> SunSpecSim:
    return SunSpecSim(context.fleet, context.recorder, context.faults, context.settings.bind_host, context.settings.sim_modbus_port)
