"""``dercmd settings``: every ``DERCMD_*`` variable, from the classes that read them, so a new
service field or a new protocol's settings are listed without anyone writing them down."""

from __future__ import annotations

from pydantic_settings import BaseSettings

from dercmd.protocols.settings import protocol_settings
from dercmd.settings import Settings


def _rows(cls: type[BaseSettings]) -> list[tuple[str, str, str]]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows = []
    for name, field in cls.model_fields.items():
        default = "(required)" if field.is_required() else str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        rows.append((f"{prefix}{name}".upper(), default, field.description or ""))
    return rows


def every_setting() -> list[tuple[str, str, str]]:
    """``(variable, default, description)`` of every service setting, then every protocol's."""
    return sorted(_rows(Settings)) + [row for cls in protocol_settings() for row in _rows(cls)]
