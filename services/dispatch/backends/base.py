"""The one interface every device backend implements, the errors it may raise, and the
registry that names backends.

    BackendError                 a delivery attempt failed
    ├── TransientBackendError    may succeed if tried again (timeout, 5xx, 429, connection)
    └── PermanentBackendError    will not succeed as sent (refused, unknown device, bad auth)

Dispatch decides retry or fail from this tree only, never from a vendor's own exceptions:
each backend translates its protocol client's errors at its edge.
"""

from __future__ import annotations

from collections.abc import Callable
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


class DeviceBackend(Protocol):
    """Delivers one command to one device. ``send`` returns once the backend accepted it, or
    raises a :class:`BackendError`; ``callback_url`` is where an ASYNC backend reports back."""

    name: str
    supported_types: frozenset[CommandType]

    async def send(self, order: DispatchOrderV1, entity: Entity, callback_url: str) -> Accepted: ...

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
