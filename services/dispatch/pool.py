"""The backends this dispatch replica drives, each with its call slots (at most
``DERCMD_DISPATCH_CONCURRENCY`` calls out at once), its rate limit and its circuit breaker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dercmd.fleet import Fleet
from dercmd.settings import DispatchSettings

from . import backends
from .resilience import CircuitBreaker, RateLimiter


@dataclass(frozen=True, slots=True)
class Guard:
    limiter: RateLimiter
    breaker: CircuitBreaker


class BackendPool:
    """Backends are built on first use, by name (registered ones; an entity of any other fails
    with ``backend_not_available``)."""

    def __init__(self, settings: DispatchSettings, fleet: Fleet, context: backends.BackendContext) -> None:
        self._settings = settings
        self._fleet = fleet
        self._context = context
        self.backends: dict[str, backends.DeviceBackend] = {}
        self.calls: dict[str, asyncio.Semaphore] = {}
        self.guards: dict[str, Guard] = {}

    def fleet_backends(self) -> list[backends.DeviceBackend]:
        """The backends the fleet uses and this deployment has."""
        return [b for name in sorted({e.backend for e in self._fleet.entities.values()}) if (b := self.get(name))]

    def name_for(self, entity_id: str) -> str | None:
        """The entity's backend, if it is in the fleet and deployed here."""
        entity = self._fleet.entity(entity_id)
        backend = self.get(entity.backend) if entity else None
        return backend.name if backend else None

    def get(self, name: str) -> backends.DeviceBackend | None:
        if name not in self.backends:
            backend = backends.create(name, self._context)
            if backend is None:
                return None
            self.backends[name] = backend
            self.calls[name] = asyncio.Semaphore(self._settings.dispatch_concurrency)
            own = backends.registered()[name].settings()
            self.guards[name] = Guard(
                RateLimiter(self._context.redis, name, own.rate_per_s, own.burst),
                CircuitBreaker(name, self._settings.dispatch_breaker_failures, self._settings.dispatch_breaker_open_s),
            )
        return self.backends[name]

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()
