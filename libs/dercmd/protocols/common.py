"""What the bulk REST device protocols share: camelCase wire models, the error a whole call
raises, one keep-alive client that turns HTTP failures into that error, and measurement
reports (BRIEF 2.2), which every such backend offers the same way:

    PUT  {base}/v1/reports:subscription   body ReportSubscription {"url", "token"}  -> 204
        Where the backend posts its devices' periodic reports from now on (a PUT replaces the
        subscription; every dispatch replica puts the same one, so repeating it is harmless).
    later, periodically:
        POST {url}   Authorization: Bearer <token>   body DeviceReports {"reports": [DeviceReport, ...]}
        Reports of many devices in one POST (up to 500 each), spread over the reporting interval.
    POST {base}/v1/reports:request        body ReportRequest {"deviceIds": [...]}     1..1000 ids
        -> 200 DeviceReports: a report now from each known device that measures (others are left out)

and what became of commands sent earlier, which resolves a call that got no answer:

    POST {base}/v1/commands:status   body StatusQuery {"commandIds": [...]}   1..1000 ids
        -> 200 StatusAnswer {"results": [{"commandId", "status", "message"?}, ...]}, in request
           order: SUCCEEDED / FAILED (the device's result), PENDING (the device has it, no
           result yet), UNKNOWN (never seen: it did not reach the device)

A :class:`DeviceReport` carries ``nextReportAt``, when the device's next periodic report is
due, so that a caller can tell whether asking for an extra one is worth it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

MAX_REPORTS_PER_POST = 500
MAX_REPORT_REQUEST = 1000

W = TypeVar("W", bound="Wire")
M = TypeVar("M", bound=BaseModel)


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class DeviceReport(Wire):
    """One device's measurements at ``at``, e.g. ``{"activePowerW": 3500, "limitPercentage":
    70, "assets": {"inverter-a": {"activePowerW": 1500, "limitPercentage": 30}, ...}}``."""

    device_id: str
    at: datetime
    next_report_at: datetime | None = None
    measurements: dict[str, Any]


class DeviceReports(Wire):
    reports: list[DeviceReport]


class ReportSubscription(Wire):
    url: str
    token: str


class ReportRequest(Wire):
    device_ids: list[str] = Field(min_length=1, max_length=MAX_REPORT_REQUEST)


MAX_STATUS_QUERY = 1000


class StatusQuery(Wire):
    command_ids: list[str] = Field(min_length=1, max_length=MAX_STATUS_QUERY)


class CommandStatus(Wire):
    command_id: str
    status: Literal["SUCCEEDED", "FAILED", "PENDING", "UNKNOWN"]
    message: str | None = None


class StatusAnswer(Wire):
    results: list[CommandStatus]


class DeviceApiError(Exception):
    """A whole call failed: there are no per-item results.

    ``unknown``: the request left and no usable answer came (a read timeout, a dropped
    connection, a gateway timeout, a malformed answer): some of what was sent may have reached
    the devices. Otherwise nothing was acted on, and ``retriable`` says whether the same call
    may succeed later (connection refused, 429, 5xx); ``retry_after_s`` is the backend's
    Retry-After, when it sent one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retriable: bool, retry_after_s: float | None = None,
        unknown: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = retriable
        self.retry_after_s = retry_after_s
        self.unknown = unknown


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class JsonClient:
    """One backend's REST API, over a pool of keep-alive connections, bearer-authenticated with
    a fixed ``token`` (None: the subclass authenticates each call itself, e.g. with OAuth2
    access tokens). Subclasses name their error class; every failed call raises it."""

    error: type[DeviceApiError] = DeviceApiError

    def __init__(
        self, base_url: str, token: str | None, *, timeout_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"} if token is not None else {},
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: Wire, answer: type[W]) -> W:
        """POST ``body``; the answer read as ``answer``."""
        return self.read(await self.request("POST", path, body), answer)

    def read(self, response: httpx.Response, answer: type[M]) -> M:
        """An answer's body as ``answer``; a body that is not one means nobody can say what
        the call did (``unknown``)."""
        try:
            return answer.model_validate_json(response.content)
        except ValidationError as exc:
            raise self.error(f"malformed answer: {exc}", status=response.status_code, retriable=False, unknown=True) from exc

    async def request(
        self, method: str, path: str, body: Wire | None = None, *, ok: int = 200, params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None, form: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One call that answered ``ok``, or :attr:`error`. ``body`` goes as JSON, ``form`` as
        ``application/x-www-form-urlencoded`` (an OAuth2 token request); ``headers`` add to the
        client's."""
        request_headers = dict(headers or {})
        if body is not None:
            request_headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(
                method, path, content=body.dump() if body is not None else None, data=form, params=params,
                headers=request_headers,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # No connection, so the request never left.
            raise self.error(f"not sent: {exc!r}", retriable=True) from exc
        except httpx.TransportError as exc:
            # Sent, or partly sent, and no answer: the request may have reached the devices.
            raise self.error(f"no answer: {exc!r}", retriable=False, unknown=True) from exc
        status = response.status_code
        if status != ok:
            raise self.error(
                f"HTTP {status}: {response.text[:300]}",
                status=status,
                retriable=status == 429 or status >= 500,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
                # A gateway that gave up waiting: the backend behind it may have acted.
                unknown=status in (502, 504),
            )
        return response

    def check_order(self, answered: Sequence[str], asked: Sequence[str]) -> None:
        """Per-item answers come one per item, in request order, or the call failed."""
        if list(answered) != list(asked):
            raise self.error(
                f"answer does not match the batch: {len(answered)} results for {len(asked)} commands", status=200,
                retriable=False, unknown=True,
            )

    async def command_status(self, command_ids: Sequence[str]) -> list[CommandStatus]:
        """What became of 1..1000 commands sent earlier, one status per id in the order given."""
        answer = await self.call("/v1/commands:status", StatusQuery(command_ids=list(command_ids)), StatusAnswer)
        self.check_order([r.command_id for r in answer.results], command_ids)
        return answer.results

    # -- measurement reports -------------------------------------------------------------

    async def subscribe_reports(self, url: str, token: str) -> None:
        """From now on the backend posts its devices' periodic reports to ``url`` with ``token``."""
        await self.request("PUT", "/v1/reports:subscription", ReportSubscription(url=url, token=token), ok=204)

    async def request_reports(self, device_ids: Sequence[str]) -> list[DeviceReport]:
        """A report now from each of 1..1000 devices (those that measure; others are left out)."""
        return (await self.call("/v1/reports:request", ReportRequest(device_ids=list(device_ids)), DeviceReports)).reports
