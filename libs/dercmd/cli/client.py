"""The REST API as the CLI sees it: an async client per command, and every way a call can fail
turned into one line for the operator (never a traceback)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
#: The example fleet's token (deploy/fleet.example.yaml), so `make run` then `dercmd send` works.
DEFAULT_TOKEN = "dev-contributor"
#: Exit codes (docs/api.md, "Operator CLI"): 1 an error or refusal, 2 bad usage (as click's own).
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as a line on stderr (plus ``details``) and a non-zero exit code."""

    def __init__(self, message: str, *, details: list[str] | None = None, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.code = code


class ApiError(CliError):
    """The API answered with an error: ``{key, message, ...}`` and an HTTP status."""

    def __init__(self, status: int, key: str, message: str, extra: dict[str, Any]) -> None:
        super().__init__(f"{key}: {message}", details=_details(extra))
        self.status = status
        self.key = key
        self.body = {"key": key, "message": message, **extra}

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        """The error a response carries. An answer without a ``key`` (a proxy's page, or a
        server without that route) is named by its status so it still reads as one line."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "key" in body:
            extra = {k: v for k, v in body.items() if k not in ("key", "message")}
            return cls(response.status_code, str(body["key"]), str(body.get("message", "")), extra)
        request = response.request
        detail = body.get("detail") if isinstance(body, dict) else None
        text = detail or response.text[:200] or response.reason_phrase
        return cls(response.status_code, f"http_{response.status_code}", f"{text} ({request.method} {request.url})", {})


def _details(extra: dict[str, Any]) -> list[str]:
    """The extra fields of an error, one line each; ``errors`` (validation) one per problem."""
    lines = []
    for name, value in extra.items():
        if name == "errors" and isinstance(value, list):
            problems = [e for e in value if isinstance(e, dict)]
            lines += [f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in problems]
        else:
            lines.append(f"{name}: {value}")
    return lines


def path(template: str, *ids: str) -> str:
    """An API path with ids quoted, so an id with ``/`` or ``?`` cannot change the route."""
    return template.format(*(quote(i, safe="") for i in ids))


@dataclass(frozen=True)
class Api:
    """Where the API is and who calls it. ``transport`` replaces the network (tests)."""

    url: str
    token: str
    transport: httpx.AsyncBaseTransport | None = None
    timeout_s: float = 10.0

    def client(self, concurrency: int = 1) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            transport=self.transport,
            timeout=self.timeout_s,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )


async def call(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Any:
    """One call: the JSON answer, or :class:`ApiError` / :class:`CliError` saying what went wrong."""
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.ConnectError as exc:
        raise CliError(
            f"cannot reach the dercmd API at {client.base_url} ({exc or 'connection refused'}). "
            "Start it with `make run`, or point --url / DERCMD_API_URL at it."
        ) from exc
    except httpx.TimeoutException as exc:
        raise CliError(
            f"no answer from {client.base_url} to {method} {url} within {client.timeout.read} s "
            "(a command it was sending may or may not have been taken)"
        ) from exc
    except httpx.HTTPError as exc:
        raise CliError(f"{method} {client.base_url.join(url)} failed: {exc!r}") from exc
    if response.is_success:
        return response.json() if response.content else None
    raise ApiError.of(response)
