"""The REST API (BRIEF 2): one router per API (:mod:`.routes`), commands built in one place
(:mod:`.commands`), admitted by group commit (:mod:`.admission`). Every error is JSON
``{"key": ..., "message": ...}`` with a stable key."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
import sqlalchemy.exc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dercmd import topics
from dercmd.fleet import Fleet
from dercmd.ledger import Ledger
from dercmd.service import Service
from dercmd.settings import Settings

from . import metrics
from .admission import Admission, Refusal
from .context import Intake
from .requests_consumer import RequestsHandler
from .routes import batch_commands, entity_commands, queries

log = logging.getLogger(__name__)


def build(settings: Settings) -> Service:
    """The intake service: the REST API, and the consumer of the requests topic."""
    fleet = Fleet.load(settings.fleet_file)
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
    requests = RequestsHandler(admission)
    service.starters.append(lambda: asyncio.to_thread(ledger.create_schema))
    service.closers.append(lambda: asyncio.to_thread(ledger.close))
    service.health_checks.append(lambda: asyncio.to_thread(ledger.ping))
    service.consume(topics.REQUESTS, requests, on_invalid=requests.on_invalid)
    app = service.app

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        metrics.REFUSED.labels("rest", exc.key).inc()
        return JSONResponse({"key": exc.key, "message": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(aioredis.ConnectionError)
    @app.exception_handler(aioredis.TimeoutError)
    @app.exception_handler(TimeoutError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _dependency(request: Request, exc: Exception) -> JSONResponse:
        metrics.REFUSED.labels("rest", "dependency_unavailable").inc()
        log.warning("dependency unavailable", extra={"error": repr(exc), "path": request.url.path})
        return JSONResponse({"key": "dependency_unavailable", "message": "a backing service is unavailable; retry later"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REFUSED.labels("rest", "validation_error").inc()
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return JSONResponse({"key": "validation_error", "message": "the request is not valid", "errors": errors}, status_code=400)

    intake = Intake(fleet, admission, ledger)
    for module in (entity_commands, batch_commands, queries):
        app.include_router(module.router(intake))
    return service
