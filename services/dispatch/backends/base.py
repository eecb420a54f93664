"""The one interface every device backend implements, the errors it may raise, and the
registry that names backends.

    BackendError                 a delivery attempt failed
    ├── TransientBackendError    may succeed if tried again (timeout, 5xx, 429, connection)
    └── PermanentBackendError    will not succeed as sent (refused, unknown device, bad auth)

Dispatch decides retry or fail from this tree only, never from a vendor's own exceptions:
each backend translates its protocol client's errors at its edge.

Besides delivering, a backend may offer what only some protocols can: saying what became of
commands it was sent (:class:`OutcomeQueries`, for delivery checks) and measurement reports
(:class:`ReportingBackend`). Dispatch asks ``isinstance`` once per backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Entity
from dercmd.protocols.common import DeviceReport
from dercmd.settings import Settings


class BackendError(Exception):
    retriable = False

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # stable, short: goes into Failed.reason
        self.detail = detail


class TransientBackendError(BackendError):
    retriable = True


class PermanentBackendError(BackendError):
    retriable = False


class Confirmation(Enum):
    """How a backend learns that the device carried a command out."""

    SYNC = "sync"  # the accepted answer already means done: Succeeded follows Sent at once
    ASYNC = "async"  # the result arrives later (a callback): dispatch waits for it


@dataclass(frozen=True, slots=True)
class Accepted:
    confirmation: Confirmation
    backend_ref: str | None = None  # the backend's own id of the request


@dataclass(frozen=True, slots=True)
class Delivery:
    """One command for one device. ``token`` is what an ASYNC backend hands back with the
    result, so that dispatch knows the result is genuine and which command it is about."""

    order: DispatchOrderV1
    entity: Entity
    token: str


class DeviceBackend(Protocol):
    """Delivers commands to devices, up to ``max_batch`` in one call (1 for a protocol that
    takes one command at a time).

    ``send`` returns one answer per delivery, in order: :class:`Accepted`, or the
    :class:`BackendError` that refused it. It raises a :class:`BackendError` when the call as
    a whole failed (every delivery in it shares that fate)."""

    name: str
    supported_types: frozenset[CommandType]
    max_batch: int

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]: ...

    async def aclose(self) -> None: ...


class Finding(Enum):
    """What a backend knows of a command it was sent."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    PENDING = "PENDING"  # accepted, no result yet
    UNKNOWN = "UNKNOWN"  # the backend does not know the command


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    finding: Finding
    message: str | None = None


@runtime_checkable
class OutcomeQueries(Protocol):
    """A backend that can say what became of commands it was sent: one :class:`CommandOutcome`
    per ``(entity, command id)``, in order, however many are asked (it cuts them into calls
    itself). Raises a :class:`BackendError` when it cannot say."""

    async def outcomes(self, commands: Sequence[tuple[Entity, str]]) -> list[CommandOutcome]: ...


@runtime_checkable
class ReportingBackend(Protocol):
    """A backend whose devices send measurement reports: periodically to the URL subscribed
    (with the token, as a bearer token), and now on request (devices that do not measure are
    left out of the answer). Raises a :class:`BackendError` when a call fails."""

    async def subscribe_reports(self, url: str, token: str) -> None: ...

    async def request_reports(self, entities: Sequence[Entity]) -> list[DeviceReport]: ...


BackendFactory = Callable[[Settings], DeviceBackend]

_REGISTRY: dict[str, BackendFactory] = {}


def register(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Register a backend factory under ``name``; a name is registered once."""

    def decorator(factory: BackendFactory) -> BackendFactory:
        if name in _REGISTRY:
            raise ValueError(f"backend {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def registered() -> frozenset[str]:
    return frozenset(_REGISTRY)


def create(name: str, settings: Settings) -> DeviceBackend | None:
    factory = _REGISTRY.get(name)
    return factory(settings) if factory else None
