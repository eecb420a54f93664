"""What every protocol's client settings share: the base of each device backend's own settings
(``DERCMD_<NAME>_*``), and the one of the bulk REST protocols. They live beside the protocol
clients, so that everyone who speaks a protocol (dispatch's backend, the OCPP gateway, the
simulator) reads them from the library, never from another service."""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from dercmd.settings import FromFiles, ServiceSettings


class BackendSettings(FromFiles):
    """A backend's own settings; a subclass sets ``env_prefix`` to ``DERCMD_<NAME>_``. Every
    backend may be rate limited (``rate_per_s``: calls per second over all dispatch replicas,
    0: unlimited, with bursts of ``burst`` calls)."""

    model_config = SettingsConfigDict(extra="ignore")
    #: Fields whose default means "on this machine" (the local simulator, this gateway): a
    #: stack started beside others (:func:`dercmd.launcher.isolated_env`) holds them at it,
    #: whatever the environment says (:func:`local_defaults`).
    LOCAL: ClassVar[tuple[str, ...]] = ()

    rate_per_s: float = Field(0.0, ge=0, description="Calls per second to this backend over all dispatch replicas (0: unlimited).")
    burst: int = Field(10, ge=1, description="Calls that may go at once after a quiet spell, within the rate.")


class BulkRestSettings(BackendSettings):
    """Where a bulk REST backend is and how dispatch authenticates to it; a subclass names its
    ``SIMULATED`` path (the local simulator's, used when ``url`` is empty) and its defaults."""

    SIMULATED: ClassVar[str]
    LOCAL = ("url",)

    url: str = Field("", description="Base URL of the backend; empty: the local simulator.")
    token: str = Field(description="Bearer token dispatch presents to the backend.")
    timeout_s: float = Field(5.0, gt=0, description="Deadline of one call to the backend, in seconds.")

    def base_url(self, settings: ServiceSettings) -> str:
        return self.url or f"http://{settings.bind_host}:{settings.simulator_port}/{self.SIMULATED}"


def protocol_settings() -> list[type[BackendSettings]]:
    """Every protocol's settings class (one with its ``DERCMD_<NAME>_`` prefix), in the order
    of their prefixes: every module of :mod:`dercmd.protocols` is imported to find them, so a
    new protocol's settings are found by being there."""
    package = importlib.import_module(__package__ or "dercmd.protocols")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    found: list[type[BackendSettings]] = []
    pending: list[type[BackendSettings]] = [BackendSettings]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.model_config.get("env_prefix") and cls.__module__.startswith("dercmd.protocols."):  # not a base, nor a test's
            found.append(cls)
    return sorted(found, key=lambda cls: str(cls.model_config["env_prefix"]))


def local_defaults() -> dict[str, str]:
    """``DERCMD_<NAME>_<FIELD>`` -> its default, for every ``LOCAL`` field of every protocol's
    settings."""
    found = {f"{cls.model_config['env_prefix']}{name}".upper(): str(cls.model_fields[name].default)
             for cls in protocol_settings() for name in cls.LOCAL}
    return dict(sorted(found.items()))
