"""The REST API (BRIEF 2): one router per API (:mod:`.routes`), commands built in one place
(:mod:`.commands`), admitted by group commit (:mod:`.admission`). Every error is JSON
``{"key": ..., "message": ...}`` with a stable key (:mod:`dercmd.web`; a refusal is an
:class:`~dercmd.web.ApiError`)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from dercmd import topics, web
from dercmd.fleet import Fleet
from dercmd.ledger import Ledger
from dercmd.service import Service
from dercmd.settings import IntakeSettings, refuse_published
from dercmd.state.idempotency import IdempotencyKeys

from . import metrics
from .admission import Admission
from .context import Intake
from .idempotency import Idempotency
from .requests_consumer import RequestsHandler
from .routes import batch_commands, entity_commands, queries

log = logging.getLogger(__name__)

#: The example fleet's bearer tokens (README, deploy/fleet.example.yaml): refused in production
#: in any fleet file, a copy of the example's included.
PUBLISHED_TOKENS = ("dev-contributor", "dev-viewer", "dev-partner")


def build(settings: IntakeSettings) -> Service:
    """The intake service: the REST API, and the consumer of the requests topic."""
    fleet = Fleet.load(settings.fleet_file)
    refuse_published(settings, tokens=[t for t in PUBLISHED_TOKENS if fleet.knows_token(t)])
    service = Service(
        "intake",
        settings,
        settings.api_port,
        title="dercmd",
        version="1",
        description="Commands to fleets of distributed energy resources. Errors are `{key, message}`.",
    )
    ledger = Ledger(settings.database_url)
    admission = Admission(fleet, ledger, service.publisher, service.redis, max_batch=settings.batch_max_records)
    requests = RequestsHandler(admission, refuse_misrouted=settings.requests_misrouted == "refuse")
    service.starters.append(lambda: asyncio.to_thread(ledger.create_schema))
    service.closers.append(lambda: asyncio.to_thread(ledger.close))
    service.health_checks.append(lambda: asyncio.to_thread(ledger.ping))
    requests.partitions = service.consume(topics.REQUESTS, requests, on_invalid=requests.on_invalid).topic_partitions
    app = service.app

    def _count(request: Request, key: str, status: int) -> None:
        if key not in ("not_found", "method_not_allowed"):  # a wrong URL: no command was refused
            metrics.REFUSED.labels("rest", key).inc()

    web.observe_errors(app, _count)

    intake = Intake(fleet, admission, ledger, Idempotency(IdempotencyKeys(service.redis, settings.idempotency_ttl_s)))
    for module in (entity_commands, batch_commands, queries):
        app.include_router(module.router(intake))
    return service
