"""Device backends: one package per backend (``backends/<name>/``), each registering itself by
name with :func:`register`; every package here is imported once, so dispatch's core knows none
of them by name. To add one, copy ``vendor_cloud/``: implement :class:`DeviceBackend`, give it
a :class:`BackendSettings` subclass (``DERCMD_<NAME>_*``), register the factory. Entities name
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
