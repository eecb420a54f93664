"""The one interface every device backend implements, the errors it may raise, and the
registry that names backends.

    BackendError                 a delivery attempt failed
    ├── TransientBackendError    may succeed if tried again (timeout, 5xx, 429, connection)
    └── PermanentBackendError    will not succeed as sent (refused, unknown device, bad auth)

Dispatch decides retry or fail from this tree only, never from a vendor's own exceptions:
each backend translates its protocol client's errors at its edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Entity
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
