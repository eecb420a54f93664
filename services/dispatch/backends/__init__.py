"""Device backends: one module per backend, each registering itself by name.

To add one, copy ``vendor_cloud.py``, implement :class:`DeviceBackend`, register it with
``@register("<name>")`` and import the module below. Entities name their backend in the
fleet file. Still to come: ``ocpp`` (OCPP 1.6J), ``sunspec-modbus`` (SunSpec over Modbus
TCP) and ``ev-aggregator``; their entities fail with ``backend_not_available``.
"""

from . import native_window, vendor_cloud  # noqa: F401  (register themselves)
from .base import (
    Accepted,
    BackendError,
    CommandOutcome,
    Confirmation,
    Delivery,
    DeviceBackend,
    Finding,
    OutcomeQueries,
    PermanentBackendError,
    ReportingBackend,
    TransientBackendError,
    create,
    register,
    registered,
)

__all__ = [
    "Accepted",
    "BackendError",
    "CommandOutcome",
    "Confirmation",
    "Delivery",
    "DeviceBackend",
    "Finding",
    "OutcomeQueries",
    "PermanentBackendError",
    "ReportingBackend",
    "TransientBackendError",
    "create",
    "register",
    "registered",
]
