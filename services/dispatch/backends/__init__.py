"""Device backends: one package per backend (``backends/<name>/``), each registering itself by
name with :func:`register`, with its settings and its :class:`Capabilities`; every package here
is imported once, so dispatch's core knows none of them by name. To add one, copy
``native_window/`` (docs/backends.md): implement :class:`DeviceBackend` over a protocol client
of :mod:`dercmd.protocols` whose module also holds its settings (a :class:`BackendSettings`
subclass, ``DERCMD_<NAME>_*``), declare what it carries, register the factory. Entities name
their backend in the fleet file; an entity whose backend is not registered fails with
``backend_not_available``.
"""

import importlib
import pkgutil

from .base import (
    Accepted,
    BackendContext,
    BackendError,
    BackendSettings,
    Capabilities,
    CommandOutcome,
    Confirmation,
    Delivery,
    DeliveryUnknown,
    DeviceBackend,
    DeviceResult,
    Finding,
    NotDelivered,
    OutcomeQueries,
    Query,
    Refused,
    Registration,
    ReportingBackend,
    create,
    register,
    registered,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Accepted",
    "BackendContext",
    "BackendError",
    "BackendSettings",
    "Capabilities",
    "CommandOutcome",
    "Confirmation",
    "Delivery",
    "DeliveryUnknown",
    "DeviceBackend",
    "DeviceResult",
    "Finding",
    "NotDelivered",
    "OutcomeQueries",
    "Query",
    "Refused",
    "Registration",
    "ReportingBackend",
    "create",
    "register",
    "registered",
]
