"""What a simulated inverter site holds: per asset (inverter behind the device; a device without
assets is one unit) the production limit it was given, and the feed-in it was allowed; and the
figures it reports, which follow those limits (every inverter produces its nominal power, the
sun always shines).

Only PV entities are simulated this way: EVs and charge points measure nothing here, and the
commands they get change nothing a report would show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dercmd.events import DEFAULT_PERCENTAGE, CommandType
from dercmd.fleet import Entity, EntityKind

#: Nominal power of one inverter (or of a device without assets), watts.
NOMINAL_W = 5000
_WHOLE = ""  # the one unit of a device without assets


def measures(entity: Entity) -> bool:
    return entity.kind is EntityKind.PV


@dataclass(frozen=True, slots=True)
class Limit:
    """A production limit, within its window if it has one (outside it: the default)."""

    percentage: int | float  # a SunSpec unit holds fractions (WMaxLimPct with its scale factor)
    start_at: datetime | None = None
    end_at: datetime | None = None

    def at(self, now: datetime) -> int | float:
        started = self.start_at is None or self.start_at <= now
        ended = self.end_at is not None and now >= self.end_at
        return self.percentage if started and not ended else DEFAULT_PERCENTAGE


class SimDevice:
    def __init__(self, entity: Entity) -> None:
        self.entity = entity
        self.units: tuple[str, ...] = entity.assets or (_WHOLE,)
        self._limits: dict[str, Limit] = {}
        self._feed_in_limit_w: int | None = None
        self._connected = True

    def refusal(self, assets: Sequence[str] | None, end_at: datetime | None, now: datetime) -> str | None:
        """Why the device refuses a command, or None: an asset it does not have, a window
        already over."""
        unknown = [a for a in assets or () if a not in self.entity.assets]
        if unknown:
            return f"unknown assets {unknown} (the device has {list(self.entity.assets)})"
        if end_at is not None and end_at <= now:
            return "end_at_in_the_past"
        return None

    def apply(self, type: str, value: int | None, percentage: int | float | None, assets: Sequence[str] | None = None,
              start_at: datetime | None = None, end_at: datetime | None = None) -> None:
        """Carry a command out. A limit replaces what the listed assets (none listed: all of
        them) held; 100 % without a window is the default again."""
        if type == CommandType.LIMIT_PRODUCTION_POWER:
            limit = Limit(DEFAULT_PERCENTAGE if percentage is None else percentage, start_at, end_at)
            for unit in assets or self.units:
                if limit.percentage == DEFAULT_PERCENTAGE and end_at is None:
                    self._limits.pop(unit, None)
                else:
                    self._limits[unit] = limit
        elif type == CommandType.RESET:
            self._limits.clear()
            self._feed_in_limit_w = None
            self._connected = True
        elif type == CommandType.LIMIT_FEED_IN:
            self._feed_in_limit_w = value
        elif type == CommandType.STOP_FEED_IN:
            self._feed_in_limit_w = 0
        elif type == CommandType.DISCONNECT:
            self._connected = False

    def measurements(self, now: datetime) -> dict[str, Any]:
        """``activePowerW`` (fed in), ``limitPercentage`` (production limit over the whole
        device), ``connected``, ``feedInLimitW`` when one is set, and per asset its own
        ``activePowerW`` and ``limitPercentage``."""
        percentages = {unit: (limit.at(now) if (limit := self._limits.get(unit)) else DEFAULT_PERCENTAGE) for unit in self.units}
        produced = {unit: int(NOMINAL_W * p // 100) if self._connected else 0 for unit, p in percentages.items()}
        total = sum(produced.values())
        out: dict[str, Any] = {
            "activePowerW": total if self._feed_in_limit_w is None else min(total, self._feed_in_limit_w),
            "limitPercentage": round(sum(percentages.values()) / len(percentages)),
            "connected": self._connected,
        }
        if self._feed_in_limit_w is not None:
            out["feedInLimitW"] = self._feed_in_limit_w
        if self.entity.assets:
            out["assets"] = {u: {"activePowerW": produced[u], "limitPercentage": percentages[u]} for u in self.units}
        return out
