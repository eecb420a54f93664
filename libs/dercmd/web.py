"""Serving an HTTP service (every service, the simulator) with the project's logging, and one
error envelope for all of them.

Every error answer of every service is JSON ``{"key": ..., "message": ...}`` (plus fields
that belong to the key, such as ``errors`` or ``cooldownUntil``) with a stable ``key``,
whatever failed: a route raising :class:`ApiError`, a request that does not validate, a body
that is not JSON or is nested too deeply, a route that does not exist, a method a route does
not take (``Allow`` names those it takes; ``OPTIONS`` answers 204 with it), Redis or the
database not answering (503), a bug (500, logged). :func:`install_error_envelope` sets this
up; :class:`~dercmd.service.Service` calls it for every service, the simulator itself.
A request too malformed to reach the application (an unknown method, bytes that are not
HTTP, a NUL in a header, a lying ``Content-Length``, an overlong request line) gets the
envelope too, from the HTTP server itself (:func:`http_protocol`): 400 ``bad_request``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import sqlalchemy.exc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from . import logs
from .settings import ServiceSettings

log = logging.getLogger(__name__)

#: Stable keys of the errors the framework itself answers, by HTTP status.
_STATUS_KEYS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                413: "too_large", 415: "unsupported_media_type"}

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

#: Errors of a backing service (Redis, the database): 503, the caller may retry.
UNAVAILABLE: tuple[type[Exception], ...] = (aioredis.ConnectionError, aioredis.TimeoutError, TimeoutError,
                                            sqlalchemy.exc.OperationalError)


@dataclass
class ApiError(Exception):
    """An error answer: raise it from any route of any service. ``key`` is stable (callers
    branch on it); ``extra`` adds fields to the body, ``headers`` to the answer."""

    key: str
    message: str
    status: int = 400
    extra: dict[str, object] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class ErrorBody(BaseModel):
    """The error envelope, for OpenAPI documents (``responses={400: {"model": ErrorBody}}``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    key: str = Field(description="Stable: what went wrong, for programs to branch on.")
    message: str = Field(description="What went wrong, for people.")


#: Called with the request, the key and the status of every error answer (a service's metrics).
ErrorHook = Callable[[Request, str, int], None]


def error(key: str, message: str, status: int, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An error answer in the envelope, for a route that returns it rather than raising
    :class:`ApiError` (the hooks of :func:`observe_errors` see only what the handlers answer)."""
    return JSONResponse({"key": key, "message": message, **extra}, status_code=status, headers=headers)


def observe_errors(app: FastAPI, hook: ErrorHook) -> None:
    """Have ``hook`` see every error the envelope's handlers answer (keys counted in metrics)."""
    app.state.error_hooks = [*getattr(app.state, "error_hooks", ()), hook]


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's own ``Allow`` names only the
    first route that matched the path)."""
    methods = {method for method in _METHODS
               if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in app.router.routes)}
    return sorted(methods | {"OPTIONS"}) if methods else []


def validation_errors(exc: RequestValidationError) -> tuple[str, str, list[dict[str, Any]]]:
    """The key, message and per-field errors of a request that did not validate."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        return "invalid_json", "the body is not valid JSON", errors
    return "validation_error", "the request is not valid", errors


class KnownQueryRoute(APIRoute):
    """A route (``APIRouter(route_class=KnownQueryRoute)``) that refuses a path identifier
    longer than its ``Path(max_length=...)`` with a 400 ``identifier_too_long`` before anything
    else, and answers a query parameter it
    does not take with a 400 ``validation_error`` instead of ignoring it (a misspelt
    ``ignoreCooldown`` must not pass for its default). Checked before FastAPI solves the route's
    dependencies, not as one of them: a dependency cost every request (most have no query)
    more than the check itself."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        limits = identifier_limits(self)

        async def handle_known_query(request: Request) -> Response:
            if limits:
                refuse_long_identifiers(request, limits)
            if request.scope.get("query_string"):
                refuse_unknown_query(request)
            return await handle(request)

        return handle_known_query


def identifier_limits(route: APIRoute) -> dict[str, int]:
    """The longest each path parameter of ``route`` may be (its ``Path(max_length=...)``)."""
    limits: dict[str, int] = {}
    for param in route.dependant.path_params:
        for meta in param.field_info.metadata:
            if isinstance(getattr(meta, "max_length", None), int):
                limits[param.alias] = meta.max_length
    return limits


def refuse_long_identifiers(request: Request, limits: dict[str, int]) -> None:
    """:class:`KnownQueryRoute`'s first check: an identifier in the path longer than any can be
    is a 400 ``identifier_too_long`` before anything else is done (no body read, no lookup, no
    token check: the answer says nothing of what exists, only that no id is that long)."""
    params = request.scope.get("path_params", {})
    for name, limit in limits.items():
        value = params.get(name)
        if isinstance(value, str) and len(value) > limit:
            raise ApiError("identifier_too_long", f"{name} is longer than {limit} characters ({len(value)})",
                           extra={"errors": [{"loc": ["path", name], "msg": f"at most {limit} characters"}]})


def refuse_unknown_query(request: Request) -> None:
    """:class:`KnownQueryRoute`'s check: raises a 400 for a query parameter that neither the
    route nor its dependencies take."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    todo = [dependant]
    while todo:  # the route's own query parameters and its dependencies'
        current = todo.pop()
        known.update(param.alias for param in current.query_params)
        todo.extend(current.dependencies)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ApiError("validation_error", "the request is not valid",
                       extra={"errors": [{"loc": ["query", name], "msg": "unknown query parameter"} for name in unknown]})


def install_error_envelope(app: FastAPI) -> None:
    """Every error of ``app`` in the one envelope; its OpenAPI document describes validation
    errors as the 400 they are (FastAPI's default says 422)."""

    def answer(request: Request, key: str, message: str, status: int, headers: dict[str, str] | None = None,
               extra: dict[str, Any] | None = None) -> JSONResponse:
        for hook in getattr(app.state, "error_hooks", ()):
            hook(request, key, status)
        return JSONResponse({"key": key, "message": message, **(extra or {})}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return answer(request, exc.key, exc.message, exc.status, headers=exc.headers or None, extra=exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            allow = allowed_methods(app, request)
            if request.method == "OPTIONS" and allow:
                return Response(status_code=204, headers={"Allow": ", ".join(allow)})
            return answer(request, "method_not_allowed", f"{request.method} is not allowed here; allowed: {', '.join(allow)}",
                          405, headers={"Allow": ", ".join(allow)})
        if exc.status_code == 404 and exc.detail == "Not Found":
            return answer(request, "not_found", f"no route {request.url.path}", 404)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return answer(request, "invalid_json", "the body could not be parsed (not JSON, or nested too deeply)", 400)
        key = _STATUS_KEYS.get(exc.status_code, "http_error")
        return answer(request, key, str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        key, message, errors = validation_errors(exc)
        return answer(request, key, message, 400, extra={"errors": errors})

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return answer(request, "invalid_json", "the body is nested too deeply", 400)

    @app.exception_handler(UnicodeDecodeError)
    async def _undecodable(request: Request, exc: UnicodeDecodeError) -> JSONResponse:
        return answer(request, "invalid_json", "the body is not UTF-8", 400)

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("dependency unavailable", extra={"error": repr(exc), "path": request.url.path})
        return answer(request, "dependency_unavailable", "a backing service is unavailable; retry later", 503,
                      headers={"Retry-After": "5"})

    for unavailable in UNAVAILABLE:
        app.add_exception_handler(unavailable, _unavailable)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path, "method": request.method})
        return answer(request, "internal_error", "the service failed to answer; it is logged", 500)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _validation_errors_are_400(generate())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _validation_errors_are_400(schema: dict[str, Any]) -> None:
    """Replace FastAPI's documented 422 (``HTTPValidationError``) by the envelope's 400 (a
    route's own 422 in the envelope, such as ``idempotency_key_reused``, stays)."""
    envelope = {"$ref": "#/components/schemas/ErrorBody"}
    used = False
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in str(responses.get("422")) and responses.pop("422", None) is not None:
                used = True
                responses.setdefault("400", {"description": "The request is not valid (`validation_error`, `invalid_json`)",
                                             "content": {"application/json": {"schema": envelope}}})
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    if used and "ErrorBody" not in components:
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = ErrorBody.model_json_schema()


#: What the HTTP server answers a request it cannot parse (before any application sees it).
MALFORMED_BODY = json.dumps({"key": "bad_request", "message": "the request is not valid HTTP"}).encode()


def _send_malformed(protocol: Any) -> None:
    """Answer 400 in the envelope and close: the connection's parser is broken, so the answer
    is written as bytes (uvicorn's own answer here is ``text/plain``)."""
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in protocol.server_state.default_headers:
        head.append(name + b": " + value + b"\r\n")
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(MALFORMED_BODY))
    protocol.transport.write(b"".join(head) + MALFORMED_BODY)
    protocol.transport.close()


def http_protocol() -> type[Any]:
    """uvicorn's HTTP/1.1 protocol (httptools' C parser where installed, as ``http="auto"``
    would choose, else h11) answering a malformed request in the envelope."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools is a dependency
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class EnvelopeHttpProtocol(Base):  # type: ignore[misc, valid-type]
        def send_400_response(self, msg: str) -> None:
            _send_malformed(self)

    return EnvelopeHttpProtocol


def server_config(service: str, app: FastAPI, settings: ServiceSettings, port: int) -> uvicorn.Config:
    """How every service is served (:func:`serve`)."""
    return uvicorn.Config(
        app,
        host=settings.bind_host,
        port=port,
        http=http_protocol(),
        log_config=logs.logging_config(service, settings.log_level),
        # uvicorn builds each request's access-log arguments before the logger drops them
        # (uvicorn.access is at WARNING unless DEBUG): not built at all, unless DEBUG.
        access_log=settings.log_level.upper() == "DEBUG",
        timeout_graceful_shutdown=5,
    )


def serve(service: str, app: FastAPI, settings: ServiceSettings, port: int) -> None:
    """Run until SIGINT/SIGTERM."""
    logs.configure(service, settings.log_level)
    server = uvicorn.Server(server_config(service, app, settings, port))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # as uvicorn.run: it could not start (port taken, startup failed)
