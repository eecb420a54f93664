"""A device maker's cloud API, the common shape of EV, charge-point and inverter clouds:
bearer-token auth, commands sent in bulk and answered at once per command, and each device's
result delivered later to a ``responseUrl`` the caller chose (as OCPI commands do).

    POST {base}/v1/commands:batch    Authorization: Bearer <token>
        body VendorBatch {"responseUrl", "commands": [VendorCommand, ...]}     1..1000 commands
        -> 200 VendorBatchAnswer {"results": [VendorItemResult, ...]}
           one result per command, in request order; per-item status 202 accepted (with a
           requestId), 404 unknown device, 409 device refused (with a message)
        whole-request errors: 401 bad token, 400 malformed body, 429 rate limited (Retry-After), 5xx
    later, for every accepted command:
        POST {responseUrl}  body VendorResults {"results": [VendorResult, ...]}
        The vendor groups results that are ready together into one POST (up to 500 each).

``responseToken`` is opaque to the vendor, which echoes it back with the command's result: the
receiver puts something in it (an HMAC, say) that lets it authenticate each result. Nothing
here retries; the caller decides from the per-item status and :class:`VendorCloudError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

MAX_COMMANDS_PER_BATCH = 1000
MAX_RESULTS_PER_POST = 500


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class VendorCommand(_Wire):
    device_id: str
    command_id: str
    type: str
    value: int | None = None
    response_token: str


class VendorBatch(_Wire):
    response_url: str
    commands: list[VendorCommand] = Field(min_length=1, max_length=MAX_COMMANDS_PER_BATCH)


class VendorItemResult(_Wire):
    """The vendor's answer to one command of a batch."""

    command_id: str
    status: int
    request_id: str | None = None
    message: str | None = None

    @property
    def accepted(self) -> bool:
        """The vendor took the command: its result will come to the ``responseUrl``."""
        return self.status == 202

    @property
    def retriable(self) -> bool:
        """Sending this command again may succeed (a per-item 429 or 5xx)."""
        return self.status == 429 or self.status >= 500


class VendorBatchAnswer(_Wire):
    results: list[VendorItemResult]


class VendorResult(_Wire):
    """What a device did with one accepted command, posted to the ``responseUrl``."""

    request_id: str
    command_id: str
    device_id: str
    result: Literal["SUCCEEDED", "FAILED"]
    message: str | None = None
    response_token: str


class VendorResults(_Wire):
    results: list[VendorResult]


class VendorCloudError(Exception):
    """A whole batch call failed: there are no per-item results.

    ``retriable`` says whether the same call may succeed later; ``retry_after_s`` is the
    vendor's Retry-After, when it sent one. After a timeout, a transport error or a malformed
    answer some of the commands may have reached their devices.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retriable: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = retriable
        self.retry_after_s = retry_after_s


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


class VendorCloudClient:
    """One vendor cloud, over a pool of keep-alive connections."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send_commands(self, response_url: str, commands: Sequence[VendorCommand]) -> list[VendorItemResult]:
        """Send 1..1000 commands in one call; their results arrive later at ``response_url``.

        Returns one result per command, in the order given. Raises :class:`VendorCloudError`
        when the call as a whole failed, and pydantic's ``ValidationError`` (before sending
        anything) for no commands or more than 1000.
        """
        body = VendorBatch(response_url=response_url, commands=list(commands))
        try:
            response = await self._http.post("/v1/commands:batch", content=body.model_dump_json(by_alias=True, exclude_none=True))
        except httpx.TimeoutException as exc:
            # The request may have reached the device: the caller must not assume it did not.
            raise VendorCloudError(f"timeout: {exc!r}", retriable=True) from exc
        except httpx.TransportError as exc:
            raise VendorCloudError(f"transport: {exc!r}", retriable=True) from exc
        status = response.status_code
        if status != 200:
            raise VendorCloudError(
                f"HTTP {status}: {response.text[:300]}",
                status=status,
                retriable=status == 429 or status >= 500,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        try:
            results = VendorBatchAnswer.model_validate_json(response.content).results
        except ValidationError as exc:
            raise VendorCloudError(f"malformed answer: {exc}", status=status, retriable=False) from exc
        if [r.command_id for r in results] != [c.command_id for c in commands]:
            raise VendorCloudError(
                f"answer does not match the batch: {len(results)} results for {len(commands)} commands",
                status=status,
                retriable=False,
            )
        return results
