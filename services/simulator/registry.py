"""The simulated backends, each registering itself by name (:func:`simulates`) the way
dispatch's backends do: a simulated backend is one module in ``backends/``, every module there
is imported once (``backends/__init__.py``), and the simulator's app builds whatever is
registered for the fleet, knowing none of them by name.

A factory gets a :class:`SimContext` (the simulator's settings, fleet, recorder, fault plans,
and the transport under what it POSTs back) and reads its protocol's own settings (the
credentials dispatch's backend presents, from :mod:`dercmd.protocols`). What it builds serves
its routes (``router``, mounted on the simulator's server), starts and stops with the app, and
names its devices by entity id (``by_entity``: a measuring device's :class:`~.devices.SimDevice`
answers ``/sim/devices/{id}/state``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from fastapi import APIRouter

from dercmd.fleet import Fleet
from dercmd.settings import SimulatorSettings

from .faults import Faults
from .recorder import Recorder


@dataclass(frozen=True, slots=True)
class SimContext:
    settings: SimulatorSettings
    fleet: Fleet
    recorder: Recorder
    faults: Faults
    transport: httpx.AsyncBaseTransport | None = None  # under what the simulator POSTs back (tests)


class Simulated(Protocol):
    """A running simulated backend. ``start`` may be a coroutine function or a plain one."""

    router: APIRouter
    by_entity: Mapping[str, Any]

    def start(self) -> Awaitable[None] | None: ...

    async def aclose(self) -> None: ...


SimFactory = Callable[[SimContext], Simulated]


@dataclass(frozen=True, slots=True)
class SimRegistration:
    name: str  # the backend's name, as in the fleet file and dispatch's registry
    create: SimFactory
    state: str  # the attribute of app.state it is found at (tests)


_REGISTRY: dict[str, SimRegistration] = {}


def simulates(name: str, *, state: str | None = None) -> Callable[[SimFactory], SimFactory]:
    """Register the factory of the simulated backend ``name``; ``state``: its attribute on
    ``app.state`` (default: the name with ``_`` for ``-``). A name is registered once."""

    def decorator(factory: SimFactory) -> SimFactory:
        if name in _REGISTRY:
            raise ValueError(f"simulated backend {name!r} is registered twice")
        _REGISTRY[name] = SimRegistration(name, factory, state or name.replace("-", "_"))
        return factory

    return decorator


def registered() -> dict[str, SimRegistration]:
    return dict(_REGISTRY)
