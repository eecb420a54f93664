"""SunSpec over Modbus TCP: a PV inverter's registers, as the SunSpec information models lay them
out, read and written with pymodbus's asyncio TCP client.

A SunSpec device holds the marker ``SunS`` (0x5375 0x6E53) at a base address (40000, else 0,
else 50000), then a chain of models, each ``ID``, ``L`` (its length in registers after those
two) and ``L`` registers, ending with ID 0xFFFF. What dercmd uses of it:

    model 1      common: manufacturer, model, serial number
    model 120    nameplate: ``WRtg`` (continuous power output, W) with ``WRtg_SF``
    model 121    basic settings: ``WMax`` (the maximum power output the device is set to, W)
                 with ``WMax_SF``: what ``WMaxLimPct`` is a percentage of
    model 123    immediate controls: ``Conn_WinTms``, ``Conn_RvrtTms``, ``Conn`` (0 disconnect,
                 1 connect), ``WMaxLimPct`` (% of WMax, scaled by ``WMaxLimPct_SF``),
                 ``WMaxLimPct_WinTms``, ``WMaxLimPct_RvrtTms`` (the device drops the limit by
                 itself after this many seconds; 0: never), ``WMaxLimPct_RmpTms``,
                 ``WMaxLim_Ena`` (0 disabled, 1 enabled): the first eight points of the model,
                 of which a command writes only those it needs (:data:`POINTS`)
    model 64990  dercmd's command tag (a vendor model; SunSpec leaves 64000.. to vendors):
                 ``CmdId`` (string, 32 registers: the id of the command whose values the
                 controls hold), ``CmdTyp`` (index + 1 in :data:`TAG_TYPES`, 0: none),
                 ``CmdVal`` (uint32: the command's value or percentage, 0xFFFFFFFF: none)

The tag is how a reader tells whether *its* command was carried out (a setpoint alone cannot
say whose it is). A device that places the tag model right before model 123, and implements
all eight control points, gets the tag and the controls in one write request
(:attr:`DeviceMap.block`), so the device takes both or neither; the header registers of model
123 inside that range are written with the values they hold. Otherwise (every device but
dercmd's simulator) a command writes only the points it needs, in as few requests as there are
runs of adjacent points, never a point the device does not implement (0xFFFF), and the tag
last, in a request of its own.

Every read of the block takes model 123's ``ID`` and ``L`` with it (:meth:`DeviceMap.decode`):
when they are not what discovery found, the layout changed under dercmd (:class:`LayoutChanged`)
and nothing is written until the device is discovered again.

Errors, as a caller must take them (:class:`SunSpecError`):

    Unreachable         no connection (refused, connect timeout): nothing was sent
    ExceptionAnswer     the device answered with a Modbus exception: the request was not
                        carried out. ``busy`` (0x05 ACKNOWLEDGE, 0x06 DEVICE_BUSY, 0x0B gateway
                        target failed to respond) is worth trying again; 0x0A (the gateway has
                        no path to that unit: no such device behind it), 0x01-0x03 (function,
                        address or value refused) and 0x04 (device failure) are not
    NoAnswer            the request left and no answer came (timeout, connection dropped): a
                        write may have been carried out
    UnitMissing         the device (or gateway) answered 0x04 at every base: no such unit
    NotSunSpec          no marker (reason ``not_sunspec``), model 123 missing
                        (``no_controls_model``) or truncated (``controls_truncated``), only the
                        DER models 701-704 (``der_models_unsupported``)
    LayoutChanged       model 123 is no longer where discovery found it
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from pymodbus.client import AsyncModbusTcpClient

from dercmd.settings import ServiceSettings

from .settings import BackendSettings

MARKER = (0x5375, 0x6E53)  # "SunS"
BASES = (40000, 0, 50000)
END = 0xFFFF
COMMON, NAMEPLATE, SETTINGS, CONTROLS, TAG = 1, 120, 121, 123, 64990
#: Offset of WMax_SF in model 121's body (WMax is at 0).
WMAX_SF_OFFSET = 20
#: The SunSpec 2018 DER information models (AC measurements, capability, enter service, AC
#: controls): dercmd drives model 123 only and refuses a device that has these instead.
DER_MODELS = frozenset({701, 702, 703, 704})
COMMON_LENGTH, NAMEPLATE_LENGTH, CONTROLS_LENGTH = 66, 26, 24
#: Points of model 123 a command may write: Conn_WinTms .. WMaxLim_Ena.
CONTROL_POINTS = 8
#: Their offsets in model 123's body.
POINTS = ("conn_win_tms", "conn_rvrt_tms", "conn", "wmaxlim_pct", "wmaxlim_pct_win_tms", "wmaxlim_pct_rvrt_tms",
          "wmaxlim_pct_rmp_tms", "wmaxlim_ena")
#: "Not implemented" of a uint16 or enum16 point (all eight control points are one or the other).
NOT_IMPLEMENTED = 0xFFFF
#: Offset of WMaxLimPct_SF in model 123's body.
PCT_SF_OFFSET = 21
TAG_ID_REGISTERS = 32
TAG_LENGTH = TAG_ID_REGISTERS + 3
TAG_TYPES = ("Reset", "Disconnect", "LimitFeedIn", "StopFeedIn", "LimitProductionPower")
NO_VALUE = 0xFFFFFFFF
#: "Not implemented" of a sunssf (int16) point.
SF_NOT_IMPLEMENTED = -0x8000
#: Most registers one read may take (Modbus: 125).
MAX_READ = 125
#: Unit ids a Modbus TCP gateway addresses devices by.
UNITS = range(1, 248)

ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE, DEVICE_FAILURE = 0x01, 0x02, 0x03, 0x04
ACKNOWLEDGE, DEVICE_BUSY, GATEWAY_PATH_UNAVAILABLE, GATEWAY_NO_RESPONSE = 0x05, 0x06, 0x0A, 0x0B
BUSY_CODES = frozenset({ACKNOWLEDGE, DEVICE_BUSY, GATEWAY_NO_RESPONSE})


class SunSpecError(Exception):
    #: What a caller reports the error as.
    reason = "backend_unavailable"


class Unreachable(SunSpecError):
    """No connection: nothing was sent."""


class ExceptionAnswer(SunSpecError):
    """A Modbus exception response: the request was not carried out."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"Modbus exception 0x{code:02X} to {what}")
        self.code = code

    @property
    def busy(self) -> bool:
        return self.code in BUSY_CODES


class NoAnswer(SunSpecError):
    """The request left and no answer came: a write may have been carried out."""


class UnitMissing(SunSpecError):
    """Every base answered exception 0x04: a gateway's way of saying no device has that unit id
    (or the device failed)."""

    reason = "unit_missing"


class NotSunSpec(SunSpecError):
    """No SunSpec marker, or a model dercmd needs is missing."""

    reason = "not_sunspec"


class ControlsMissing(NotSunSpec):
    reason = "no_controls_model"


class ControlsTruncated(NotSunSpec):
    reason = "controls_truncated"


class DerModelsOnly(NotSunSpec):
    reason = "der_models_unsupported"


class LayoutChanged(SunSpecError):
    """Model 123's header is not what discovery found: the device's layout changed."""

    reason = "layout_changed"


# -- registers ---------------------------------------------------------------------------


def signed(register: int) -> int:
    return register - 0x10000 if register & 0x8000 else register


def unsigned(value: int) -> int:
    return value & 0xFFFF


def encode_string(text: str, registers: int) -> list[int]:
    raw = text.encode("utf-8")[: registers * 2].ljust(registers * 2, b"\0")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]


def decode_string(registers: Sequence[int]) -> str:
    raw = b"".join(r.to_bytes(2, "big") for r in registers)
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


@dataclass(frozen=True, slots=True)
class Controls:
    """The first eight points of model 123, as registers (``wmaxlim_pct`` still scaled by the
    model's ``WMaxLimPct_SF``)."""

    conn_win_tms: int = 0
    conn_rvrt_tms: int = 0
    conn: int = 1
    wmaxlim_pct: int = 0
    wmaxlim_pct_win_tms: int = 0
    wmaxlim_pct_rvrt_tms: int = 0
    wmaxlim_pct_rmp_tms: int = 0
    wmaxlim_ena: int = 0

    def registers(self) -> list[int]:
        return [self.conn_win_tms, self.conn_rvrt_tms, self.conn, self.wmaxlim_pct, self.wmaxlim_pct_win_tms,
                self.wmaxlim_pct_rvrt_tms, self.wmaxlim_pct_rmp_tms, self.wmaxlim_ena]

    def implemented(self, point: str) -> bool:
        return getattr(self, point) != NOT_IMPLEMENTED

    @classmethod
    def of(cls, registers: Sequence[int]) -> Controls:
        return cls(*registers[:CONTROL_POINTS])


@dataclass(frozen=True, slots=True)
class CommandTag:
    """dercmd's vendor model 64990: whose values the controls hold."""

    command_id: str = ""
    type: str | None = None
    value: int | None = None

    def registers(self) -> list[int]:
        code = TAG_TYPES.index(self.type) + 1 if self.type in TAG_TYPES else 0
        value = NO_VALUE if self.value is None else self.value & 0xFFFFFFFF
        return [*encode_string(self.command_id, TAG_ID_REGISTERS), code, value >> 16, value & 0xFFFF]

    @classmethod
    def of(cls, registers: Sequence[int]) -> CommandTag:
        code = registers[TAG_ID_REGISTERS]
        value = registers[TAG_ID_REGISTERS + 1] << 16 | registers[TAG_ID_REGISTERS + 2]
        return cls(decode_string(registers[:TAG_ID_REGISTERS]), TAG_TYPES[code - 1] if 0 < code <= len(TAG_TYPES) else None,
                   None if value == NO_VALUE else value)


@dataclass(frozen=True, slots=True)
class Model:
    id: int
    address: int  # of its ID register
    length: int

    @property
    def body(self) -> int:
        return self.address + 2

    @property
    def end(self) -> int:
        return self.body + self.length


@dataclass(frozen=True, slots=True)
class DeviceMap:
    """What discovery found on one device: its models (the first of each id) and the figures
    a command needs."""

    base: int
    models: tuple[Model, ...]
    manufacturer: str = ""
    model_name: str = ""
    serial: str = ""
    rated_w: int | None = None  # WRtg x 10^WRtg_SF; None: no nameplate
    max_w: int | None = None  # WMax x 10^WMax_SF (model 121); None: no such model or not implemented
    pct_sf: int = 0  # WMaxLimPct_SF

    def find(self, model_id: int) -> Model | None:
        return next((m for m in self.models if m.id == model_id), None)

    @property
    def controls(self) -> Model:
        model = self.find(CONTROLS)
        if model is None:
            if der := sorted(m.id for m in self.models if m.id in DER_MODELS):
                raise DerModelsOnly(f"the device has the DER models {der} and no model 123: dercmd drives model 123 only")
            raise ControlsMissing(f"no immediate controls model (123) among {[m.id for m in self.models]}")
        return model

    @property
    def full_w(self) -> int | None:
        """What ``WMaxLimPct`` is a percentage of: ``WMax`` (model 121) where the device has it,
        else the nameplate's ``WRtg``."""
        return self.max_w or self.rated_w

    @property
    def tagged(self) -> bool:
        """Whether the tag model sits right before model 123: tag and controls in one write."""
        tag = self.find(TAG)
        return tag is not None and tag.length >= TAG_LENGTH and tag.end == self.controls.address

    @property
    def block(self) -> tuple[int, int]:
        """``(address, count)`` of what one read takes: tag, model 123's header and its eight
        control points when :attr:`tagged`, else the header and the control points."""
        controls = self.controls
        if self.tagged:
            tag = self.find(TAG)
            assert tag is not None
            return tag.body, tag.length + 2 + CONTROL_POINTS
        return controls.address, 2 + CONTROL_POINTS

    def encode(self, tag: CommandTag | None, controls: Controls) -> list[int]:
        """The registers of :attr:`block` holding ``tag`` (when tagged), model 123's header and
        ``controls``."""
        header = [CONTROLS, self.controls.length]
        if not self.tagged:
            return [*header, *controls.registers()]
        tag_model = self.find(TAG)
        assert tag_model is not None
        tag_registers = (tag or CommandTag()).registers()
        padding = [0] * (tag_model.length - len(tag_registers))
        return [*tag_registers, *padding, *header, *controls.registers()]

    def decode(self, registers: Sequence[int]) -> tuple[CommandTag | None, Controls]:
        """The registers of :attr:`block` as tag and controls, once model 123's header in them
        is checked against the map (:class:`LayoutChanged` when it differs)."""
        at = 0
        if self.tagged:
            tag_model = self.find(TAG)
            assert tag_model is not None
            at = tag_model.length
        header = tuple(registers[at : at + 2])
        if header != (CONTROLS, self.controls.length):
            raise LayoutChanged(f"model 123 expected at {self.controls.address}, found ID/L {header} there")
        controls = Controls.of(registers[at + 2 :])
        return (CommandTag.of(registers[:TAG_LENGTH]) if self.tagged else None), controls

    def writes(self, tag: CommandTag | None, current: Controls, target: Controls,
               points: Iterable[str]) -> list[tuple[int, list[int]]]:
        """The write requests ``(address, registers)`` that put ``target``'s ``points`` into
        the device, which holds ``current``: the whole block in one request when tagged and
        every control point is implemented; else each run of adjacent points the device
        implements, in order, then the tag on its own. A point not implemented is left alone."""
        if self.tagged and all(current.implemented(p) for p in POINTS):
            return [(self.block[0], self.encode(tag, target))]
        wanted = [i for i, p in enumerate(POINTS) if p in set(points) and current.implemented(p)]
        values = target.registers()
        requests: list[tuple[int, list[int]]] = []
        for i in wanted:
            address = self.controls.body + i
            if requests and requests[-1][0] + len(requests[-1][1]) == address:
                requests[-1][1].append(values[i])
            else:
                requests.append((address, [values[i]]))
        if self.tagged and tag is not None:
            tag_model = self.find(TAG)
            assert tag_model is not None
            requests.append((tag_model.body, tag.registers()))
        return requests


def scaled(value: int, sf: int) -> float:
    return value * 10.0**sf


Reader = Callable[[int, int], Awaitable[list[int]]]


Prober = Callable[[int], Awaitable[list[int]]]


async def find_base(read: Reader, bases: Sequence[int] = BASES, probe: Prober | None = None) -> int:
    """The base address whose first two registers are ``SunS``, tried in the order of
    ``bases`` as pysunspec2 does (40000, 0, 50000). A base the device refuses to read (an
    exception answer, other than busy) or does not answer at all (``probe`` reads the marker
    with a short deadline and reconnects after one that passed) is simply not it."""
    probe = probe or (lambda address: read(address, 2))
    found: dict[int, str] = {}  # base: what it answered
    codes: set[int | None] = set()  # exception codes; None: no answer; -1: registers, not the marker
    for base in bases:
        try:
            marker = tuple(await probe(base))
        except ExceptionAnswer as exc:
            if exc.busy:
                raise
            found[base] = f"exception 0x{exc.code:02X}"
            codes.add(exc.code)
            continue
        except NoAnswer:
            found[base] = "no answer"
            codes.add(None)
            continue
        if marker == MARKER:
            return base
        found[base] = "registers " + " ".join(f"{r:04X}" for r in marker)
        codes.add(-1)
    detail = ", ".join(f"{base}: {what}" for base, what in found.items())
    if codes == {DEVICE_FAILURE}:
        raise UnitMissing(f"exception 0x04 at every base ({detail}): no such unit behind the gateway, or it failed")
    if codes == {GATEWAY_PATH_UNAVAILABLE}:
        raise ExceptionAnswer(GATEWAY_PATH_UNAVAILABLE, f"read the marker ({detail})")
    if codes == {None}:
        raise NoAnswer(f"no answer at any base ({detail})")
    raise NotSunSpec(f"no SunS marker ({detail})")


async def walk(read: Reader, base: int, limit: int = 200) -> list[Model]:
    """The model chain after the marker, up to the end model (ID 0xFFFF; some devices hold
    its ID and not its length, which is taken as the end too)."""
    models: list[Model] = []
    address = base + 2
    for _ in range(limit):
        try:
            model_id, length = await read(address, 2)
        except ExceptionAnswer as exc:
            if exc.code != ILLEGAL_ADDRESS or (await read(address, 1)) != [END]:
                raise
            return models
        if model_id == END:
            return models
        models.append(Model(model_id, address, length))
        address += 2 + length
        if address > 0xFFFF:
            break
    raise NotSunSpec(f"model chain from {base} does not end")


async def read_long(read: Reader, address: int, count: int) -> list[int]:
    out: list[int] = []
    while count > 0:
        step = min(count, MAX_READ)
        out += await read(address, step)
        address, count = address + step, count - step
    return out


async def discover(read: Reader, bases: Sequence[int] = BASES, probe: Prober | None = None) -> DeviceMap:
    """Find the marker, walk the chain, and read the common, nameplate, settings and controls
    models."""
    base = await find_base(read, bases, probe)
    models = await walk(read, base)
    device = DeviceMap(base, tuple(models))
    if (common := device.find(COMMON)) is not None and common.length >= 64:
        body = await read_long(read, common.body, 64)
        device = replace(device, manufacturer=decode_string(body[0:16]), model_name=decode_string(body[16:32]),
                         serial=decode_string(body[48:64]))
    if (nameplate := device.find(NAMEPLATE)) is not None:
        _typ, wrtg, wrtg_sf = await read(nameplate.body, 3)
        if wrtg != 0xFFFF and signed(wrtg_sf) != SF_NOT_IMPLEMENTED:
            device = replace(device, rated_w=round(scaled(wrtg, signed(wrtg_sf))))
    if (settings := device.find(SETTINGS)) is not None and settings.length > WMAX_SF_OFFSET:
        wmax, *_, wmax_sf = await read(settings.body, WMAX_SF_OFFSET + 1)
        if wmax not in (0, 0xFFFF) and signed(wmax_sf) != SF_NOT_IMPLEMENTED:
            device = replace(device, max_w=round(scaled(wmax, signed(wmax_sf))))
    controls = device.controls
    if controls.length < CONTROLS_LENGTH:
        raise ControlsTruncated(f"model 123 at {controls.address} of length {controls.length}, not {CONTROLS_LENGTH}")
    try:
        [pct_sf] = await read(controls.body + PCT_SF_OFFSET, 1)
    except ExceptionAnswer as exc:
        if exc.code != ILLEGAL_ADDRESS:
            raise
        raise ControlsTruncated(f"model 123 at {controls.address} says length {controls.length}, "
                                f"its WMaxLimPct_SF at {controls.body + PCT_SF_OFFSET} cannot be read") from exc
    sf = signed(pct_sf)
    return replace(device, pct_sf=0 if sf == SF_NOT_IMPLEMENTED else sf)


# -- addressing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """Where a device answers: a Modbus TCP server and the unit id behind it. ``host`` empty:
    the backend's default server."""

    host: str
    port: int
    unit: int


def parse_address(text: str | None) -> Address | None:
    """``vendorDeviceId`` as an address: ``"<unit>"`` (on the default server) or
    ``"<host>:<port>/<unit>"``; None when it is neither (a name)."""
    if not text:
        return None
    where, slash, unit = text.rpartition("/")
    if not unit.isdigit() or int(unit) not in UNITS:
        return None
    if not slash:
        return Address("", 0, int(unit))
    host, colon, port = where.rpartition(":")
    if not colon or not host or not port.isdigit():
        return None
    return Address(host, int(port), int(unit))


def assign_units(entities: Iterable[tuple[str, str | None]]) -> dict[str, Address]:
    """The address of every SunSpec entity, given as ``(entity id, vendorDeviceId)``: its
    vendorDeviceId where that is an address, else the free unit ids of the default server in
    the order of the entity ids (sorted): the simulator and the backend compute the same.
    Entities beyond the 247th unit get none."""
    pairs = sorted(entities)
    out: dict[str, Address] = {}
    for entity_id, vendor_id in pairs:
        if (address := parse_address(vendor_id)) is not None:
            out[entity_id] = address
    taken = {a.unit for a in out.values() if not a.host}
    free = iter(u for u in UNITS if u not in taken)
    for entity_id, _ in pairs:
        if entity_id not in out and (unit := next(free, None)) is not None:
            out[entity_id] = Address("", 0, unit)
    return out


# -- the client --------------------------------------------------------------------------


def _unit_keyword() -> str:
    """pymodbus names the unit id ``device_id`` since 3.9, ``slave`` before."""
    parameters = inspect.signature(AsyncModbusTcpClient.read_holding_registers).parameters
    return "device_id" if "device_id" in parameters else "slave"


UNIT_KEYWORD = _unit_keyword()


class ModbusConnection:
    """One TCP connection to a Modbus server, one request at a time. pymodbus retries nothing
    here (``retries=0``: a write sent twice would be carried out twice) and does not reconnect
    by itself; a connection that failed a request is closed and not used again, so a late
    answer can never be taken for the next request's."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.broken = False
        self._lost = asyncio.Event()
        self._generation = 0  # of the pymodbus client in use (one per TCP connection)
        self._client = self._new_client()

    def _new_client(self) -> AsyncModbusTcpClient:
        options: dict[str, object] = {"port": self.port, "timeout": self.timeout_s, "retries": 0, "reconnect_delay": 0}
        generation = self._generation = self._generation + 1
        if "trace_connect" in inspect.signature(AsyncModbusTcpClient.__init__).parameters:
            # Only the current client's loss counts: a replaced one may report its own late.
            options["trace_connect"] = lambda connected: self._connection_changed(connected, generation)
        return AsyncModbusTcpClient(self.host, **options)  # type: ignore[arg-type]

    async def reopen(self) -> None:
        """A new TCP connection in place of a broken one (a late answer on the old one can
        never be taken for a new request's)."""
        self._client.close()
        self._client = self._new_client()
        self.broken = False
        await self.connect()

    def _connection_changed(self, connected: bool, generation: int) -> None:
        if not connected and generation == self._generation:
            self._lost.set()

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                connected = await self._client.connect()
        except (TimeoutError, OSError) as exc:
            self.close()
            raise Unreachable(f"{self.host}:{self.port}: {exc!r}") from exc
        if not connected:
            self.close()
            raise Unreachable(f"{self.host}:{self.port}: connection refused or timed out")
        self._lost.clear()

    async def read(self, unit: int, address: int, count: int, timeout_s: float | None = None) -> list[int]:
        response = await self._request(self._client.read_holding_registers(address, count=count, **{UNIT_KEYWORD: unit}),
                                       f"read {count} at {address} of unit {unit}", timeout_s)
        return list(response.registers)  # type: ignore[attr-defined]

    async def write(self, unit: int, address: int, values: Sequence[int]) -> None:
        await self._request(self._client.write_registers(address, list(values), **{UNIT_KEYWORD: unit}),
                            f"write {len(values)} at {address} of unit {unit}")

    async def _request(self, call: Awaitable[object], what: str, timeout_s: float | None = None) -> object:
        if self.broken:
            raise Unreachable(f"{self.host}:{self.port}: connection closed")
        request = asyncio.ensure_future(call)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait({request, lost}, timeout=timeout_s or self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if request not in done:
            request.cancel()
            with contextlib.suppress(BaseException):
                await request
            self.close()
            raise NoAnswer(f"{what}: {'connection lost' if self._lost.is_set() else 'no answer in time'}")
        try:
            response = request.result()
        except Exception as exc:  # pymodbus: ModbusIOException, ConnectionException
            self.close()
            raise NoAnswer(f"{what}: {exc!r}") from exc
        if response.isError():  # type: ignore[attr-defined]
            raise ExceptionAnswer(int(getattr(response, "exception_code", 0)), what)
        return response

    def close(self) -> None:
        self.broken = True
        self._client.close()


@dataclass
class ConnectionPool:
    """Up to ``size`` connections to one server, each lent to one caller at a time."""

    host: str
    port: int
    timeout_s: float
    size: int = 4
    _idle: list[ModbusConnection] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[ModbusConnection]:
        """A connection for a sequence of requests; one that failed is closed, not returned."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            connection = self._idle.pop() if self._idle else None
            if connection is None or connection.broken:
                connection = ModbusConnection(self.host, self.port, self.timeout_s)
                await connection.connect()
            try:
                yield connection
            except BaseException:
                connection.close()
                raise
            if connection.broken:
                return
            self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class SunSpecClient:
    """One SunSpec device (a unit behind a Modbus TCP server) over a lent connection.
    ``probe_timeout_s``: the deadline of reading the marker at one base during discovery (a
    device may not answer at all at a base it does not use)."""

    def __init__(self, connection: ModbusConnection, unit: int, probe_timeout_s: float | None = None) -> None:
        self.connection, self.unit = connection, unit
        self.probe_timeout_s = probe_timeout_s

    async def read(self, address: int, count: int) -> list[int]:
        return await self.connection.read(self.unit, address, count)

    async def _probe(self, base: int) -> list[int]:
        try:
            return await self.connection.read(self.unit, base, 2, self.probe_timeout_s)
        except NoAnswer:
            await self.connection.reopen()
            raise

    async def discover(self, known_base: int | None = None) -> DeviceMap:
        """The device's map; ``known_base`` (where it was found before) is tried first."""
        bases = BASES if known_base is None else (known_base, *(b for b in BASES if b != known_base))
        return await discover(self.read, bases, self._probe)

    async def read_block(self, device: DeviceMap) -> tuple[CommandTag | None, Controls]:
        """Tag and controls, model 123's header checked (:class:`LayoutChanged`)."""
        address, count = device.block
        return device.decode(await self.read(address, count))

    async def write(self, requests: Sequence[tuple[int, Sequence[int]]], written: Callable[[], None] | None = None) -> None:
        """The write requests of :meth:`DeviceMap.writes`, in order; ``written`` is called after
        the first one was carried out (what follows is a partly written command)."""
        for i, (address, values) in enumerate(requests):
            await self.connection.write(self.unit, address, values)
            if i == 0 and written is not None:
                written()


class SunSpecModbusSettings(BackendSettings):
    model_config = SettingsConfigDict(env_prefix="DERCMD_SUNSPEC_MODBUS_", extra="ignore")
    LOCAL = ("host", "port")

    host: str = Field("", description="Modbus TCP server of units addressed without a host; empty: the local simulator (DERCMD_BIND_HOST).")
    port: int = Field(0, ge=0, description="Its port; 0: the simulator's (DERCMD_SIM_MODBUS_PORT).")
    timeout_s: float = Field(2.0, gt=0, description="Deadline of one Modbus request (and of connecting), in seconds.")
    probe_timeout_s: float = Field(1.0, gt=0, description="Deadline of reading the SunSpec marker at one base address "
                                   "(40000, 0, 50000) during discovery: a device silent at a base it does not use costs this.")
    connections: int = Field(8, ge=1, description="Connections dispatch holds open to one Modbus TCP server (units served at once).")

    def server(self, settings: ServiceSettings) -> tuple[str, int]:
        return self.host or settings.bind_host, self.port or settings.sim_modbus_port
