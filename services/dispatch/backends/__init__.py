"""Device backends: one module per backend, each registering itself by name.

To add one, copy ``vendor_cloud.py``, implement :class:`DeviceBackend`, register it with
``@register("<name>")`` and import the module below. Entities name their backend in the
fleet file. Still to come: ``ocpp`` (OCPP 1.6J), ``sunspec-modbus`` (SunSpec over Modbus
TCP), ``ev-aggregator`` and ``native-window``; their entities fail with ``backend_not_available``.
"""

from . import vendor_cloud  # noqa: F401  (registers itself)
from .base import (
    Accepted,
    BackendError,
    Confirmation,
    Delivery,
    DeviceBackend,
    PermanentBackendError,
    TransientBackendError,
    create,
    register,
    registered,
)

__all__ = [
    "Accepted",
    "BackendError",
    "Confirmation",
    "Delivery",
    "DeviceBackend",
    "PermanentBackendError",
    "TransientBackendError",
    "create",
    "register",
    "registered",
]
