"""SunSpec's register logic without a network: discovery over a register map in memory, the
command tag and controls as registers, unit addresses, and what each command writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dercmd.dispatch.backends.sunspec_modbus.mapping import (
    Unmappable,
    controls_for,
    holds,
    pct_register,
    points_for,
    revert_timer,
    tag_for,
)
from dercmd.events import CommandType, DispatchOrderV1
from dercmd.protocols import sunspec as ss

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Registers:
    """A device's holding registers; reading outside them is an illegal-address answer."""

    def __init__(self, base: int, models: list[tuple[int, list[int]]]) -> None:
        self.values: dict[int, int] = {}
        self.reads: list[tuple[int, int]] = []
        address = base
        self.put(address, list(ss.MARKER))
        address += 2
        for model_id, body in models:
            self.put(address, [model_id, len(body), *body])
            address += 2 + len(body)
        self.put(address, [ss.END, 0])

    def put(self, address: int, values: list[int]) -> None:
        for i, v in enumerate(values):
            self.values[address + i] = v

    async def read(self, address: int, count: int) -> list[int]:
        self.reads.append((address, count))
        if any(a not in self.values for a in range(address, address + count)):
            raise ss.ExceptionAnswer(ss.ILLEGAL_ADDRESS, "read")
        return [self.values[a] for a in range(address, address + count)]


def common(manufacturer: str = "sma", serial: str = "SN-1") -> list[int]:
    return (ss.encode_string(manufacturer, 16) + ss.encode_string("inv", 16) + ss.encode_string("", 8)
            + ss.encode_string("1", 8) + ss.encode_string(serial, 16) + [1, 0])


def nameplate(wrtg: int, sf: int) -> list[int]:
    return [4, wrtg, ss.unsigned(sf)] + [0] * 23


def controls(pct_sf: int = -1) -> list[int]:
    body = [0] * ss.CONTROLS_LENGTH
    body[2], body[3] = 1, 1000
    body[ss.PCT_SF_OFFSET] = ss.unsigned(pct_sf)
    return body


def tag() -> list[int]:
    return ss.CommandTag().registers()


def order(type: CommandType, *, value: int | None = None, percentage: int | None = None, end_at: datetime | None = None,
          assets: tuple[str, ...] | None = None) -> DispatchOrderV1:
    return DispatchOrderV1(command_id="c-1", entity_id="pv-1", type=type, value=value, percentage=percentage, fence=1,
                           accepted_at=NOW, ordered_at=NOW, end_at=end_at, asset_identifiers=assets)


async def test_discovery_walks_the_chain_and_reads_what_commands_need() -> None:
    regs = Registers(40000, [(1, common()), (103, [0] * 50), (120, nameplate(1234, 1)), (ss.TAG, tag()), (123, controls(-2))])
    device = await ss.discover(regs.read)
    assert device.base == 40000
    assert [m.id for m in device.models] == [1, 103, 120, ss.TAG, 123]
    assert (device.manufacturer, device.serial) == ("sma", "SN-1")
    assert device.rated_w == 12340
    assert device.pct_sf == -2
    assert device.tagged
    tag_model = device.find(ss.TAG)
    assert device.block == (tag_model.body, ss.TAG_LENGTH + 2 + ss.CONTROL_POINTS)


async def test_the_marker_is_found_at_0_or_50000_when_40000_holds_none() -> None:
    for base in (0, 50000):
        regs = Registers(base, [(1, common()), (123, controls())])
        device = await ss.discover(regs.read)
        assert device.base == base
        assert device.rated_w is None and not device.tagged
        assert device.block == (device.controls.address, 2 + ss.CONTROL_POINTS)  # model 123's header read with it


async def test_no_marker_or_no_controls_is_not_sunspec() -> None:
    regs = Registers(40000, [(1, common())])
    regs.put(40000, [0, 0])
    with pytest.raises(ss.NotSunSpec):
        await ss.discover(regs.read)
    with pytest.raises(ss.NotSunSpec):
        await ss.discover(Registers(40000, [(1, common()), (120, nameplate(5000, 0))]).read)


async def test_a_tag_not_right_before_the_controls_is_not_written_with_them() -> None:
    regs = Registers(40000, [(1, common()), (ss.TAG, tag()), (120, nameplate(5000, 0)), (123, controls())])
    assert not (await ss.discover(regs.read)).tagged


async def test_a_busy_device_is_not_taken_for_one_without_a_marker() -> None:
    async def busy(address: int, count: int) -> list[int]:
        raise ss.ExceptionAnswer(ss.DEVICE_BUSY, "read")

    with pytest.raises(ss.ExceptionAnswer):
        await ss.discover(busy)


def test_tag_and_controls_round_trip_through_registers() -> None:
    t = ss.CommandTag("a" * 64, "LimitProductionPower", 40)
    assert len(t.registers()) == ss.TAG_LENGTH
    assert ss.CommandTag.of(t.registers()) == t
    assert ss.CommandTag.of(ss.CommandTag("x:revert", "Reset").registers()) == ss.CommandTag("x:revert", "Reset", None)
    c = ss.Controls(conn=0, wmaxlim_pct=455, wmaxlim_pct_rvrt_tms=90, wmaxlim_ena=1)
    assert ss.Controls.of(c.registers()) == c


def test_a_tagged_block_is_tag_header_and_controls() -> None:
    device = ss.DeviceMap(40000, (ss.Model(ss.TAG, 40100, ss.TAG_LENGTH), ss.Model(123, 40100 + 2 + ss.TAG_LENGTH, 24)))
    c = ss.Controls(wmaxlim_pct=500, wmaxlim_ena=1)
    registers = device.encode(ss.CommandTag("c-1", "StopFeedIn"), c)
    assert len(registers) == device.block[1]
    assert registers[ss.TAG_LENGTH : ss.TAG_LENGTH + 2] == [123, 24]
    assert device.decode(registers) == (ss.CommandTag("c-1", "StopFeedIn"), c)


def test_addresses_from_vendor_ids_else_free_units_in_entity_order() -> None:
    assert ss.parse_address("7") == ss.Address("", 0, 7)
    assert ss.parse_address("10.0.0.5:502/3") == ss.Address("10.0.0.5", 502, 3)
    assert ss.parse_address("inverter-7") is None and ss.parse_address("0") is None and ss.parse_address("248") is None
    got = ss.assign_units([("pv-c", None), ("pv-a", "2"), ("pv-b", None), ("pv-d", "h:1/1")])
    assert got == {"pv-a": ss.Address("", 0, 2), "pv-b": ss.Address("", 0, 1), "pv-c": ss.Address("", 0, 3),
                   "pv-d": ss.Address("h", 1, 1)}
    many = ss.assign_units((f"pv-{i:03}", None) for i in range(250))
    assert len(many) == 247 and sorted(a.unit for a in many.values()) == list(range(1, 248))


def test_percentages_in_the_scale_factor_rounded_down_and_clamped() -> None:
    assert pct_register(40, -1) == 400
    assert pct_register(100, -2) == 10000
    assert pct_register(40, 0) == 40
    assert pct_register(150, -1) == 1000 and pct_register(-5, -1) == 0


def test_revert_timer_is_the_seconds_left_rounded_up() -> None:
    assert revert_timer(None, NOW) == 0
    assert revert_timer(NOW + timedelta(seconds=90, milliseconds=1), NOW) == 91
    assert revert_timer(NOW + timedelta(hours=19), NOW) == 0  # beyond the register: dercmd's revert only


DEVICE = ss.DeviceMap(40000, (ss.Model(123, 40002, 24),), rated_w=5000, pct_sf=-1)
HELD = ss.Controls(conn=1, wmaxlim_pct=1000, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=0)


@pytest.mark.parametrize(("o", "expected"), [
    (order(CommandType.LIMIT_FEED_IN, value=2500), ss.Controls(conn=1, wmaxlim_pct=500, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=1)),
    (order(CommandType.LIMIT_FEED_IN, value=1234), ss.Controls(conn=1, wmaxlim_pct=246, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=1)),
    (order(CommandType.LIMIT_FEED_IN, value=9000), ss.Controls(conn=1, wmaxlim_pct=1000, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=1)),
    (order(CommandType.STOP_FEED_IN), ss.Controls(conn=1, wmaxlim_pct=0, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=1)),
    (order(CommandType.LIMIT_PRODUCTION_POWER, percentage=40), ss.Controls(conn=1, wmaxlim_pct=400, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=1)),
    (order(CommandType.LIMIT_PRODUCTION_POWER, percentage=40, end_at=NOW + timedelta(minutes=15)),
     ss.Controls(conn=1, wmaxlim_pct=400, wmaxlim_pct_rvrt_tms=900, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=1)),
    (order(CommandType.DISCONNECT), ss.Controls(conn=0, wmaxlim_pct=1000, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=0)),
    (order(CommandType.RESET), ss.Controls(conn=1, wmaxlim_pct=1000, wmaxlim_pct_rmp_tms=7, wmaxlim_ena=0)),
])
def test_what_each_command_writes(o: DispatchOrderV1, expected: ss.Controls) -> None:
    assert controls_for(o, HELD, DEVICE, NOW) == expected


def test_reset_clears_a_limit_and_reconnects_and_a_limit_keeps_the_connection() -> None:
    limited = ss.Controls(conn=0, conn_rvrt_tms=5, wmaxlim_pct=300, wmaxlim_pct_rvrt_tms=60, wmaxlim_ena=1)
    assert controls_for(order(CommandType.RESET), limited, DEVICE, NOW) == ss.Controls(conn=1, wmaxlim_pct=1000)
    assert controls_for(order(CommandType.LIMIT_PRODUCTION_POWER, percentage=100), limited, DEVICE, NOW).conn == 0


@pytest.mark.parametrize(("o", "device", "reason"), [
    (order(CommandType.LIMIT_FEED_IN, value=100), ss.DeviceMap(40000, (), pct_sf=-1), "no_rated_power"),
    (order(CommandType.LIMIT_PRODUCTION_POWER, percentage=10, assets=("inv-a",)), DEVICE, "assets_unsupported"),
    (order(CommandType.LIMIT_PRODUCTION_POWER, percentage=10, end_at=NOW), DEVICE, "end_at_in_the_past"),
    (order(CommandType.START_CHARGING), DEVICE, "unsupported_type"),
])
def test_what_the_registers_cannot_say_is_refused(o: DispatchOrderV1, device: ss.DeviceMap, reason: str) -> None:
    with pytest.raises(Unmappable) as caught:
        controls_for(o, HELD, device, NOW)
    assert caught.value.reason == reason


def test_the_tag_carries_value_or_percentage_and_holds_ignores_a_counting_timer() -> None:
    assert tag_for(order(CommandType.LIMIT_FEED_IN, value=2500)) == ss.CommandTag("c-1", "LimitFeedIn", 2500)
    assert tag_for(order(CommandType.LIMIT_PRODUCTION_POWER, percentage=40)) == ss.CommandTag("c-1", "LimitProductionPower", 40)
    target = ss.Controls(wmaxlim_pct=400, wmaxlim_pct_rvrt_tms=900, wmaxlim_ena=1)
    assert holds(target, ss.Controls(wmaxlim_pct=400, wmaxlim_pct_rvrt_tms=897, wmaxlim_ena=1))
    assert not holds(target, ss.Controls(wmaxlim_pct=390, wmaxlim_pct_rvrt_tms=900, wmaxlim_ena=1))


# -- issue 20: the map checked, WMax, only the points a command needs, discovery ---------------


def settings_model(wmax: int, sf: int) -> list[int]:
    body = [0] * 30
    body[0], body[ss.WMAX_SF_OFFSET] = wmax, ss.unsigned(sf)
    return body


async def test_wmax_of_model_121_is_what_a_percentage_is_of_and_wrtg_without_it() -> None:
    regs = Registers(40000, [(1, common()), (120, nameplate(8000, 0)), (121, settings_model(600, 1)), (123, controls())])
    device = await ss.discover(regs.read)
    assert (device.rated_w, device.max_w, device.full_w) == (8000, 6000, 6000)
    assert controls_for(order(CommandType.LIMIT_FEED_IN, value=3000), HELD, device, NOW).wmaxlim_pct == 500  # 50.0 %
    no_wmax = await ss.discover(Registers(40000, [(120, nameplate(8000, 0)), (121, settings_model(0xFFFF, 0)), (123, controls())]).read)
    assert no_wmax.full_w == 8000


def test_a_block_whose_header_moved_is_a_layout_change() -> None:
    device = ss.DeviceMap(40000, (ss.Model(123, 40002, 24),), pct_sf=-1)
    assert device.decode([123, 24, *HELD.registers()]) == (None, HELD)
    with pytest.raises(ss.LayoutChanged):
        device.decode([121, 30, *HELD.registers()])


def test_only_the_points_a_command_needs_and_the_device_implements_are_written() -> None:
    device = ss.DeviceMap(40000, (ss.Model(123, 40002, 24),), pct_sf=-1)
    no_timers = ss.Controls(conn_win_tms=0xFFFF, conn_rvrt_tms=0xFFFF, conn=1, wmaxlim_pct=1000, wmaxlim_pct_win_tms=0xFFFF,
                            wmaxlim_pct_rvrt_tms=0xFFFF, wmaxlim_pct_rmp_tms=0xFFFF, wmaxlim_ena=0)
    limit = order(CommandType.LIMIT_PRODUCTION_POWER, percentage=40, end_at=NOW + timedelta(minutes=5))
    target = controls_for(limit, no_timers, device, NOW)
    assert target.wmaxlim_pct_rvrt_tms == 0xFFFF  # not implemented: left as it is
    body = device.controls.body
    assert device.writes(None, no_timers, target, points_for(limit)) == [(body + 3, [400]), (body + 7, [1])]
    target = controls_for(limit, HELD, device, NOW)
    assert device.writes(None, HELD, target, points_for(limit)) == [(body + 3, [400, 0, 300]), (body + 7, [1])]
    disconnect = order(CommandType.DISCONNECT)
    assert device.writes(None, no_timers, controls_for(disconnect, no_timers, device, NOW), points_for(disconnect)) == [(body + 2, [0])]
    # A tag right before model 123: one request when every point is implemented, else the tag last.
    tagged = ss.DeviceMap(40000, (ss.Model(ss.TAG, 40002, ss.TAG_LENGTH), ss.Model(123, 40004 + ss.TAG_LENGTH, 24)), pct_sf=-1)
    tag = ss.CommandTag("c-1", "LimitProductionPower", 40)
    [(address, registers)] = tagged.writes(tag, HELD, target, points_for(limit))
    assert address == 40004 and registers == tagged.encode(tag, target)
    requests = tagged.writes(tag, no_timers, controls_for(limit, no_timers, tagged, NOW), points_for(limit))
    assert requests[-1] == (40004, tag.registers()) and len(requests) == 3


def test_a_command_whose_main_point_is_not_implemented_is_refused_and_holds_compares_what_was_written() -> None:
    with pytest.raises(Unmappable) as caught:
        controls_for(order(CommandType.DISCONNECT), ss.Controls(conn=0xFFFF), DEVICE, NOW)
    assert caught.value.reason == "not_implemented"
    target = ss.Controls(conn=0, wmaxlim_pct=300, wmaxlim_ena=1)
    assert holds(target, ss.Controls(conn=0, wmaxlim_pct=999), ("conn_win_tms", "conn_rvrt_tms", "conn"))
    assert not holds(target, ss.Controls(conn=0, wmaxlim_pct=999))


async def test_an_end_model_without_its_length_ends_the_chain() -> None:
    regs = Registers(40000, [(1, common()), (123, controls())])
    end = max(regs.values)
    del regs.values[end]  # the end model's L
    device = await ss.discover(regs.read)
    assert [m.id for m in device.models] == [1, 123]


async def test_discovery_says_what_each_base_answered() -> None:
    async def failed(address: int, count: int) -> list[int]:
        raise ss.ExceptionAnswer(ss.DEVICE_FAILURE, "read")

    with pytest.raises(ss.UnitMissing):
        await ss.discover(failed)
    regs = Registers(50000, [(1, common()), (123, controls())])
    probed: list[int] = []

    async def silent_below_50000(base: int) -> list[int]:
        probed.append(base)
        if base != 50000:
            raise ss.NoAnswer("no answer in time")
        return await regs.read(base, 2)

    assert (await ss.discover(regs.read, ss.BASES, silent_below_50000)).base == 50000
    assert probed == [40000, 0, 50000]
    with pytest.raises(ss.ControlsTruncated):
        await ss.discover(Registers(40000, [(1, common()), (123, [0] * 10)]).read)
    with pytest.raises(ss.DerModelsOnly):
        await ss.discover(Registers(40000, [(1, common()), (701, [0] * 10)]).read)
    with pytest.raises(ss.ControlsMissing):
        await ss.discover(Registers(40000, [(1, common())]).read)
