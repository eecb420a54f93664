"""What each command writes into a SunSpec inverter's immediate controls (model 123), as registers.

    LimitFeedIn (W)           WMaxLimPct = value / WMax (model 121; WRtg of model 120 when the
                              device has no WMax) rounded down, at most 100 %, WMaxLim_Ena = 1
    StopFeedIn                WMaxLimPct = 0 %, WMaxLim_Ena = 1
    LimitProductionPower (%)  WMaxLimPct = percentage, WMaxLim_Ena = 1; with a window (``end_at``)
                              WMaxLimPct_RvrtTms = the seconds left until its end (rounded up,
                              0 when beyond the register's 18 h), so the device drops the limit
                              itself even if dercmd's revert never comes; dercmd's revert
                              (100 %, no timer) is harmless before or after the device's own
    Disconnect                Conn = 0 (no window, no revert timer)
    Reset                     Conn = 1, WMaxLimPct = 100 %, WMaxLim_Ena = 0, no timers

Every limit is immediate (``WMaxLimPct_WinTms`` = 0) and keeps the device's ramp time; a limit
leaves ``Conn`` as it is, and ``Disconnect`` leaves the limit. A Modbus unit is one inverter:
a command for listed assets is refused. ``LimitFeedIn`` needs ``WMax`` (model 121) or the
nameplate's ``WRtg`` (model 120): ``WMaxLimPct`` is a percentage of ``WMax``, which may be set
below the rating. A SunSpec inverter limits its output, so a feed-in limit is a limit of
production.

Only the points a command names (:func:`points_for`) are written; a timer the device does not
implement (0xFFFF) is left as it is (a window then ends by dercmd's revert alone), and a
command whose main point (``Conn``, ``WMaxLimPct``, ``WMaxLim_Ena``) is not implemented is
refused (``not_implemented``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime
from fractions import Fraction

from dercmd.events import CommandType, DispatchOrderV1
from dercmd.protocols import sunspec as ss
from dercmd.protocols.sunspec import CommandTag, Controls, DeviceMap

#: The points of model 123 each command writes (those the device implements).
LIMIT = ("wmaxlim_pct", "wmaxlim_pct_win_tms", "wmaxlim_pct_rvrt_tms", "wmaxlim_ena")
CONNECTION = ("conn_win_tms", "conn_rvrt_tms", "conn")
POINTS_BY_TYPE: dict[CommandType, tuple[str, ...]] = {
    CommandType.RESET: (*CONNECTION, *LIMIT),
    CommandType.DISCONNECT: CONNECTION,
    CommandType.STOP_FEED_IN: LIMIT,
    CommandType.LIMIT_FEED_IN: LIMIT,
    CommandType.LIMIT_PRODUCTION_POWER: LIMIT,
}
#: Points without which a command cannot be carried out.
MAIN_POINTS = frozenset({"conn", "wmaxlim_pct", "wmaxlim_ena"})

#: The longest revert timer the register holds, seconds.
MAX_TIMER_S = 0xFFFF


class Unmappable(Exception):
    """The command cannot be put into this device's registers: refused for good."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def pct_register(percent: Fraction | int, sf: int) -> int:
    """A percentage as ``WMaxLimPct`` holds it with scale factor ``sf`` (rounded down), within
    0..100 %."""
    percent = min(max(Fraction(percent), Fraction(0)), Fraction(100))
    return math.floor(percent / Fraction(10) ** sf)


def revert_timer(end_at: datetime | None, now: datetime) -> int:
    """``WMaxLimPct_RvrtTms`` for a window ending at ``end_at``: the whole seconds left,
    rounded up (the device never drops the limit before the window's end); 0 without a window
    or when the register cannot hold it."""
    if end_at is None:
        return 0
    seconds = math.ceil((end_at - now).total_seconds())
    return seconds if 0 < seconds <= MAX_TIMER_S else 0


def points_for(order: DispatchOrderV1) -> tuple[str, ...]:
    return POINTS_BY_TYPE.get(order.type, ())


def controls_for(order: DispatchOrderV1, current: Controls, device: DeviceMap, now: datetime) -> Controls:
    """The controls after ``order``, from what the device holds now; a point the device does
    not implement keeps its not-implemented value."""
    target = _controls_for(order, current, device, now)
    missing = [p for p in points_for(order) if p in MAIN_POINTS and not current.implemented(p)]
    if missing:
        raise Unmappable("not_implemented", f"the device does not implement {', '.join(missing)} of model 123")
    return replace(target, **{p: getattr(current, p) for p in points_for(order) if not current.implemented(p)})


def _controls_for(order: DispatchOrderV1, current: Controls, device: DeviceMap, now: datetime) -> Controls:
    if order.asset_identifiers:
        raise Unmappable("assets_unsupported", f"a SunSpec unit is one inverter; assets {list(order.asset_identifiers)} cannot be addressed")
    sf = device.pct_sf
    if order.type == CommandType.RESET:
        return replace(current, conn_win_tms=0, conn_rvrt_tms=0, conn=1, wmaxlim_pct=pct_register(100, sf),
                       wmaxlim_pct_win_tms=0, wmaxlim_pct_rvrt_tms=0, wmaxlim_ena=0)
    if order.type == CommandType.DISCONNECT:
        return replace(current, conn_win_tms=0, conn_rvrt_tms=0, conn=0)
    if order.type == CommandType.STOP_FEED_IN:
        return _limit(current, pct_register(0, sf), 0)
    if order.type == CommandType.LIMIT_FEED_IN:
        if not device.full_w:
            raise Unmappable("no_rated_power", "the device has neither WMax (model 121) nor WRtg (model 120) to turn watts into a percentage")
        return _limit(current, pct_register(Fraction(100 * (order.value or 0), device.full_w), sf), 0)
    if order.type == CommandType.LIMIT_PRODUCTION_POWER:
        if order.end_at is not None and order.end_at <= now:
            raise Unmappable("end_at_in_the_past", f"the window ended at {order.end_at.isoformat()}")
        percentage = 100 if order.percentage is None else order.percentage
        return _limit(current, pct_register(percentage, sf), revert_timer(order.end_at, now))
    raise Unmappable("unsupported_type", f"{order.type} is not a SunSpec inverter command")


def _limit(current: Controls, register: int, timer_s: int) -> Controls:
    return replace(current, wmaxlim_pct=register, wmaxlim_pct_win_tms=0, wmaxlim_pct_rvrt_tms=timer_s, wmaxlim_ena=1)


def tag_for(order: DispatchOrderV1) -> CommandTag:
    value = order.percentage if order.type == CommandType.LIMIT_PRODUCTION_POWER else order.value
    return CommandTag(order.command_id, order.type.value, value)


def holds(target: Controls, actual: Controls, points: tuple[str, ...] | None = None) -> bool:
    """Whether the device holds what was written to ``points`` (all eight when None; its revert
    timer may be counting)."""
    names = [p for p in (points or ss.POINTS) if p != "wmaxlim_pct_rvrt_tms"]
    return all(getattr(actual, p) == getattr(target, p) for p in names)
