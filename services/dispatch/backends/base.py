"""The one interface every device backend implements, what dispatch offers it, the outcomes a
delivery attempt has, and the registry that names backends.

A delivery attempt ends in one of three ways besides :class:`Accepted`:

    BackendError
    ├── NotDelivered      did not reach the device, safe to send again (connection refused,
    │                     429, 5xx before the vendor acted, circuit open): dispatch retries it
    │                     with backoff and jitter inside the command's deadline
    ├── Refused           will never succeed as sent (unknown device, refused, bad auth):
    │                     the command ends Failed
    └── DeliveryUnknown   the request left and no answer came (a timeout, a dropped
                          connection): the device may have it. It is never sent again
                          blindly: dispatch asks the backend what became of it
                          (:class:`OutcomeQueries`, which reads the device back where the
                          protocol can) and goes on from the answer

Dispatch decides from this tree only, never from a protocol client's own exceptions: each
backend translates its client's errors at its edge.

A backend is a package (``backends/<name>/``) that registers a factory once
(:func:`register`), with its settings class and the :class:`Capabilities` it declares (which
dispatch checks the compatibility table against when it creates the backend); dispatch's core
knows none of them by name. The factory gets a :class:`BackendContext` (dispatch's settings,
fleet, Redis, and the way to report results) and reads its own settings
(:class:`BackendSettings`, ``DERCMD_<NAME>_*``, beside its protocol client in
:mod:`dercmd.protocols`). A backend that receives
callbacks offers an ``APIRouter`` as ``router``, mounted on dispatch's HTTP server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Entity, Fleet
from dercmd.protocols.common import DeviceReport
from dercmd.protocols.settings import BackendSettings
from dercmd.settings import DispatchSettings, refuse_published

from .capabilities import Capabilities, refuse_mismatched

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from fastapi import APIRouter


class BackendError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # stable, short: goes into Failed.reason
        self.detail = detail


class NotDelivered(BackendError):
    """The command did not reach the device: sending it again is safe. ``retry_after_s``: the
    backend asked for a pause (429 ``Retry-After``), which every replica honours."""

    def __init__(self, reason: str, detail: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after_s = retry_after_s


class Refused(BackendError):
    """The backend or device refused the command for good."""


class DeliveryUnknown(BackendError):
    """The request left and no answer came: the device may or may not have the command."""


class Confirmation(Enum):
    """How a backend learns that the device carried a command out."""

    SYNC = "sync"  # the accepted answer already means done: Succeeded follows Sent at once
    ASYNC = "async"  # the result arrives later (a callback, a poll): dispatch waits for it


@dataclass(frozen=True, slots=True)
class Accepted:
    confirmation: Confirmation
    backend_ref: str | None = None  # the backend's own id of the request


@dataclass(frozen=True, slots=True)
class Delivery:
    """One command for one device. ``token`` is what an ASYNC backend hands back with the
    result (:meth:`BackendContext.entity_of`), so that dispatch knows the result is genuine and
    which command it is about."""

    order: DispatchOrderV1
    entity: Entity
    token: str


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """What a device did with a command, as its backend learned it asynchronously."""

    entity_id: str
    command_id: str
    succeeded: bool
    message: str | None = None


@dataclass(frozen=True, slots=True)
class BackendContext:
    """What dispatch offers a backend.

    ``report``: results the backend learned asynchronously (a callback, a poll, a device's
    own message); each goes through the command's delivery state, so only the first result of
    a command counts. Returns each one's delivery state (``emit``, ``deferred``, ``done:...``,
    ``missing``)."""

    settings: DispatchSettings
    fleet: Fleet
    redis: aioredis.Redis
    callback_base_url: str
    token: Callable[[str, str], str]
    entity_of: Callable[[str, str], str | None]
    report: Callable[[Sequence[DeviceResult]], Awaitable[list[str]]]


class DeviceBackend(Protocol):
    """Delivers commands to devices, up to ``max_batch`` in one call (1 for a protocol that
    takes one command at a time).

    ``send`` returns one answer per delivery, in order: :class:`Accepted`, or the
    :class:`BackendError` that says what happened to it. It raises a :class:`BackendError`
    when the call as a whole failed (every delivery in it shares that fate).

    ``router``: routes the backend receives callbacks on (None: none), mounted on dispatch's
    HTTP server. ``start`` runs once before the first ``send``; ``aclose`` at stop."""

    name: str
    supported_types: frozenset[CommandType]
    max_batch: int
    router: APIRouter | None

    async def start(self) -> None: ...

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]: ...

    async def aclose(self) -> None: ...


class Finding(Enum):
    """What a backend knows of a command it was sent."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    PENDING = "PENDING"  # the device has it, no result yet
    UNKNOWN = "UNKNOWN"  # the backend (or device) never got it: safe to send again


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    finding: Finding
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Query:
    """A command to ask a backend about. ``order``: the order as it was sent, where dispatch
    has it (a delivery whose fate is unknown; not a delivery check, which knows only the id)."""

    entity: Entity
    command_id: str
    order: DispatchOrderV1 | None = None


@runtime_checkable
class OutcomeQueries(Protocol):
    """A backend that can say what became of commands it was sent (reading the device back
    where the protocol can): one :class:`CommandOutcome` per query, in order, however many
    are asked (it cuts them into calls itself). Used for a delivery whose fate is unknown and
    for delivery checks. Raises a :class:`BackendError` when it cannot say."""

    async def outcomes(self, queries: Sequence[Query]) -> list[CommandOutcome]: ...


@runtime_checkable
class ReportingBackend(Protocol):
    """A backend whose devices send measurement reports: periodically to the URL subscribed
    (with the token, as a bearer token), and now on request (devices that do not measure are
    left out of the answer). Raises a :class:`BackendError` when a call fails."""

    async def subscribe_reports(self, url: str, token: str) -> None: ...

    async def request_reports(self, entities: Sequence[Entity]) -> list[DeviceReport]: ...


BackendFactory = Callable[[BackendContext], DeviceBackend]

@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    create: BackendFactory
    settings: type[BackendSettings]
    capabilities: Capabilities


_REGISTRY: dict[str, Registration] = {}


def register(name: str, settings: type[BackendSettings], capabilities: Capabilities) -> Callable[[BackendFactory], BackendFactory]:
    """Register a backend factory under ``name`` with its settings class and what it can
    carry; a name is registered once."""

    def decorator(factory: BackendFactory) -> BackendFactory:
        if name in _REGISTRY:
            raise ValueError(f"backend {name!r} is registered twice")
        _REGISTRY[name] = Registration(name, factory, settings, capabilities)
        return factory

    return decorator


def registered() -> dict[str, Registration]:
    return dict(_REGISTRY)


def create(name: str, context: BackendContext) -> DeviceBackend | None:
    """The backend ``name`` for dispatch, None when none is registered by that name. Stops
    the service (a clear message, exit status 1) while a secret of it holds its documented
    default in production, or while the fleet's compatibility table promises more than the
    backend declares (:func:`.capabilities.refuse_mismatched`). Dispatch creates every backend
    its fleet uses at start-up, so a mismatch stops it before it takes an order."""
    registration = _REGISTRY.get(name)
    if registration is None:
        return None
    refuse_published(context.settings, registration.settings())
    refuse_mismatched(context.fleet.compatibility, [registration])
    return registration.create(context)
