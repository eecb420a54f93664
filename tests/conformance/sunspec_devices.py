"""SunSpec devices dercmd did not write: register images built from the SunSpec Alliance's model
definitions (pysunspec2's ``sunspec2/models/json/model_*.json``), served by pymodbus's Modbus
TCP server, and read back with pysunspec2's Modbus client.

An image holds, from its base, the marker, the models given (each point the value given, every
other point its type's not-implemented value, as the SunSpec information models define them),
and the end model. A :class:`Device` can be strict (refuses, with exception 0x02, a write to a
point it does not implement or that is not writable, as some inverters do), locked (refuses
every write), silent at some addresses (never answers a read there), and have its image
replaced while connections stay up (a layout change). Units no device has answer 0x04.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

MARKER = (0x5375, 0x6E53)
END = 0xFFFF

#: Not-implemented values by SunSpec point type, as registers (big-endian words).
_NOT_IMPLEMENTED = {
    "int16": [0x8000], "uint16": [0xFFFF], "count": [0xFFFF], "acc16": [0], "enum16": [0xFFFF], "bitfield16": [0xFFFF],
    "sunssf": [0x8000], "pad": [0x8000], "int32": [0x8000, 0], "uint32": [0xFFFF, 0xFFFF], "acc32": [0, 0],
    "enum32": [0xFFFF, 0xFFFF], "bitfield32": [0xFFFF, 0xFFFF], "float32": [0x7FC0, 0], "ipaddr": [0, 0],
    "int64": [0x8000, 0, 0, 0], "uint64": [0xFFFF] * 4, "acc64": [0] * 4, "float64": [0x7FF8, 0, 0, 0],
}


@dataclass(frozen=True)
class Point:
    model: int
    name: str
    offset: int  # in the model's body
    size: int
    type: str
    writable: bool

    def not_implemented(self) -> list[int]:
        if self.type == "string" or self.type not in _NOT_IMPLEMENTED:
            return [0] * self.size
        return list(_NOT_IMPLEMENTED[self.type])


def points(model_id: int) -> list[Point]:
    """The points of a model's top-level group after ``ID`` and ``L``, from pysunspec2's
    definition."""
    text = (resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json").read_text()
    group = json.loads(text)["group"]
    if group.get("groups"):
        raise ValueError(f"model {model_id} has repeating groups, which these images do not build")
    out, offset = [], 0
    for p in group["points"][2:]:
        size = int(p.get("size", 1))
        out.append(Point(model_id, p["name"], offset, size, p["type"], p.get("access") == "RW"))
        offset += size
    return out


def encode(point: Point, value: int | str) -> list[int]:
    if isinstance(value, str):
        raw = value.encode()[: 2 * point.size].ljust(2 * point.size, b"\0")
        return [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]
    value &= (1 << (16 * point.size)) - 1
    return [(value >> (16 * (point.size - 1 - i))) & 0xFFFF for i in range(point.size)]


@dataclass
class Image:
    base: int
    registers: dict[int, int]
    #: address -> the point whose register it is (headers and marker have none)
    owners: dict[int, Point]
    #: model id -> address of its ID register (the first of that id)
    addresses: dict[int, int]

    def address(self, model_id: int, name: str) -> int:
        point = next(p for p in points(model_id) if p.name == name)
        return self.addresses[model_id] + 2 + point.offset

    def get(self, model_id: int, name: str) -> int:
        return self.registers[self.address(model_id, name)]

    def model_registers(self, model_id: int) -> list[int]:
        at = self.addresses[model_id]
        return [self.registers[a] for a in range(at, at + 2 + self.registers[at + 1])]


Models = Sequence[tuple[int, Mapping[str, int | str]]]


def build(base: int, models: Models, *, lengths: Mapping[int, int] | None = None, end_length: bool = True) -> Image:
    """The image of a device: at ``base`` the marker, then ``models`` (id, {point: raw value});
    ``lengths`` overrides a model's ``L`` (a truncated model: only that many registers);
    ``end_length`` False: the end model holds its ID and no length register."""
    registers: dict[int, int] = {base: MARKER[0], base + 1: MARKER[1]}
    owners: dict[int, Point] = {}
    addresses: dict[int, int] = {}
    at = base + 2
    for model_id, values in models:
        defined = points(model_id)
        body: list[int] = []
        mine: list[Point] = []
        for p in defined:
            words = encode(p, values[p.name]) if p.name in values else p.not_implemented()
            body += words
            mine += [p] * len(words)
        length = len(body) if lengths is None or model_id not in lengths else lengths[model_id]
        addresses.setdefault(model_id, at)
        registers[at], registers[at + 1] = model_id, length
        for i in range(length):
            registers[at + 2 + i] = body[i]
            owners[at + 2 + i] = mine[i]
        at += 2 + length
    registers[at] = END
    if end_length:
        registers[at + 1] = 0
    return Image(base, registers, owners, addresses)


@dataclass
class Device:
    image: Image
    strict: bool = False  # refuse a write to an unimplemented or read-only point (0x02)
    locked: bool = False  # refuse every write (0x02)
    silent: frozenset[int] = frozenset()  # addresses at which a read is never answered
    writes: list[tuple[int, list[int]]] = field(default_factory=list)

    def read(self, address: int, count: int) -> list[int] | ExcCodes:
        if any(a not in self.image.registers for a in range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        return [self.image.registers[a] for a in range(address, address + count)]

    def write(self, address: int, values: Sequence[int]) -> ExcCodes | None:
        if self.locked:
            return ExcCodes.ILLEGAL_ADDRESS
        for i, value in enumerate(values):
            at = address + i
            if at not in self.image.registers:
                return ExcCodes.ILLEGAL_ADDRESS
            owner = self.image.owners.get(at)
            if owner is None:  # marker, headers: only with what they hold
                if self.image.registers[at] != value:
                    return ExcCodes.ILLEGAL_ADDRESS
                continue
            if self.strict and (not owner.writable or self._unimplemented(owner)):
                return ExcCodes.ILLEGAL_ADDRESS
        for i, value in enumerate(values):
            self.image.registers[address + i] = value
        self.writes.append((address, list(values)))
        return None

    def _unimplemented(self, point: Point) -> bool:
        at = self.image.address(point.model, point.name) if point.model in self.image.addresses else None
        if at is None:
            return False
        return [self.image.registers[at + i] for i in range(point.size)] == point.not_implemented()


class _Units(ModbusServerContext):
    """pymodbus's server context over :class:`Device` objects by unit id (0x04 for others)."""

    def __init__(self, devices: dict[int, Device]) -> None:  # not the parent's: no datastore blocks
        self.devices = devices
        self.old_simulator = True
        self.simdevices = []

    def device_ids(self) -> list[int]:
        return list(self.devices)

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1) -> Any:
        device = self.devices.get(device_id)
        if device is None:
            return ExcCodes.DEVICE_FAILURE
        if address in device.silent:
            await asyncio.sleep(3600)
        return device.read(address, count)

    async def async_setValues(self, device_id: int, func_code: int, address: int, values: Sequence[int]) -> Any:
        device = self.devices.get(device_id)
        if device is None:
            return ExcCodes.DEVICE_FAILURE
        return device.write(address, values)


@asynccontextmanager
async def serving(devices: dict[int, Device], port: int) -> AsyncIterator[None]:
    """pymodbus's Modbus TCP server answering for ``devices`` on 127.0.0.1:``port``."""
    server = ModbusTcpServer(_Units(devices), address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    try:
        yield
    finally:
        await server.shutdown()


def read_back(port: int, unit: int, base: int | None = None) -> dict[int, dict[str, Any]]:
    """What pysunspec2 reads from the device (blocking: run it in a thread): every model by id,
    each point's raw value (None where not implemented) and, under ``"<name>:c"``, its value
    with its scale factor applied. ``base``: where pysunspec2 scans first (default: its own
    order, 40000, 0, 50000)."""
    client = SunSpecModbusClientDeviceTCP(slave_id=unit, ipaddr="127.0.0.1", ipport=port, timeout=1)
    if base is not None:
        client.base_addr_list = [base, *(b for b in client.base_addr_list if b != base)]
    try:
        client.scan()
        out: dict[int, dict[str, Any]] = {}
        for key, models in client.models.items():
            if not isinstance(key, int):
                continue
            model = models[0]
            values: dict[str, Any] = {}
            for name, point in model.points.items():
                values[name] = point.value
                values[f"{name}:c"] = point.cvalue
            out[key] = values
        return out
    finally:
        client.close()


def limit_with_pysunspec2(port: int, unit: int, percent: float) -> None:
    """pysunspec2 limits the device itself: WMaxLimPct and WMaxLim_Ena only, as its write of
    changed points does."""
    client = SunSpecModbusClientDeviceTCP(slave_id=unit, ipaddr="127.0.0.1", ipport=port, timeout=1)
    try:
        client.scan()
        controls = client.models[123][0]
        controls.WMaxLimPct.cvalue = percent
        controls.WMaxLim_Ena.value = 1
        controls.write()
    finally:
        client.close()
