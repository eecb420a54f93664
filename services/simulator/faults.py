"""Fault injection, per device and at run time (``PUT /sim/faults``), for every simulated
backend. A plan says which devices (all, or a list), how often (``probability`` per call) and
which faults, one drawn at random per faulty call:

    latency            the device acts, the answer comes ``latencyMs`` late
    5xx                refused with a server error before acting: not delivered
    429                refused as rate limited (``Retry-After: retryAfterS``) before acting
    timeout_after_act  the device acts, then no answer until long after the caller gave up
    drop_connection    the device acts, then the connection closes without an answer
    lose_callback      the device acts and the call is answered, but the result it would
                       report later (a callback, a transaction message) never comes

Each simulated backend applies the drawn fault in its own protocol's terms (an HTTP status, a
closed WebSocket or TCP connection, a Modbus exception). A bulk call (many devices in one
request) draws a call's fault once with its first device's plan, among ``latency``, ``429``,
``timeout_after_act`` and ``drop_connection``, and then each command's, among ``5xx`` and
``lose_callback``: a vendor rate-limits a client and times out as a whole, while one device of
a batch can fail alone. A later plan for the same devices replaces the earlier one;
``DELETE /sim/faults`` clears every plan.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from . import metrics


class FaultKind(StrEnum):
    LATENCY = "latency"
    ERROR_5XX = "5xx"
    RATE_LIMITED = "429"
    TIMEOUT_AFTER_ACT = "timeout_after_act"
    DROP_CONNECTION = "drop_connection"
    LOSE_CALLBACK = "lose_callback"


#: Faults a bulk call suffers as a whole, and those each of its commands may suffer alone.
WHOLE_CALL = frozenset({FaultKind.LATENCY, FaultKind.RATE_LIMITED, FaultKind.TIMEOUT_AFTER_ACT, FaultKind.DROP_CONNECTION})
PER_COMMAND = frozenset({FaultKind.ERROR_5XX, FaultKind.LOSE_CALLBACK})


class FaultPlan(BaseModel):
    """``PUT /sim/faults``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    devices: list[str] | None = Field(None, description="Entity ids the plan applies to; absent: every device.")
    probability: float = Field(ge=0, le=1, description="Chance that one call to a device is faulty.")
    kinds: list[FaultKind] = Field(default_factory=lambda: list(FaultKind), min_length=1)
    latency_ms: int = Field(2000, ge=0, description="latency: how late the answer comes.")
    retry_after_s: float = Field(1.0, ge=0, description="429: the Retry-After the backend sends.")
    hang_s: float = Field(30.0, ge=0, description="timeout_after_act: how long the answer is held back.")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    latency_s: float
    retry_after_s: float
    hang_s: float


class Faults:
    """The plans in force, shared by every simulated backend of one simulator."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._default: FaultPlan | None = None
        self._by_device: dict[str, FaultPlan] = {}
        self._random = rng or random.Random()

    def put(self, plan: FaultPlan) -> None:
        if plan.devices is None:
            self._default = plan
        else:
            for device in plan.devices:
                self._by_device[device] = plan

    def clear(self) -> None:
        self._default = None
        self._by_device.clear()

    def plans(self) -> list[FaultPlan]:
        seen = {id(p): p for p in ([self._default] if self._default else []) + list(self._by_device.values())}
        return list(seen.values())

    @property
    def active(self) -> bool:
        return self._default is not None or bool(self._by_device)

    def draw(self, entity_id: str, among: frozenset[FaultKind] | None = None) -> Fault | None:
        """The fault of one call to the device, if this one is faulty (only kinds in
        ``among``, when given: the kinds that make sense where the caller draws)."""
        plan = self._by_device.get(entity_id, self._default)
        if plan is None or self._random.random() >= plan.probability:
            return None
        kinds = [k for k in plan.kinds if among is None or k in among]
        if not kinds:
            return None
        kind = self._random.choice(kinds)
        metrics.FAULTS.labels(kind.value).inc()
        return Fault(kind, plan.latency_ms / 1000, plan.retry_after_s, plan.hang_s)

    def draw_call(self, entity_ids: Sequence[str]) -> Fault | None:
        """The whole-call fault of a bulk call (drawn with its first device's plan)."""
        return self.draw(entity_ids[0], WHOLE_CALL) if entity_ids else None
