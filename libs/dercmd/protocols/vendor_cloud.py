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
    POST {base}/v1/commands:status   (:mod:`dercmd.protocols.common`): SUCCEEDED / FAILED is the
        device's result, whether or not its POST to the responseUrl got through
    and the measurement reports of :mod:`dercmd.protocols.common` (subscription, request).

A ``LimitProductionPower`` command carries ``percentage`` (0..100) and, for a device with
several inverters, ``assets``: only those are limited (none listed: all of them). The limit
holds until the next command; this cloud keeps no time windows, so the caller lifts a limit
itself (with ``revertOf`` naming the command whose limit ends; the device treats it like any
other command).

``responseToken`` is opaque to the vendor, which echoes it back with the command's result: the
receiver puts something in it (an HMAC, say) that lets it authenticate each result. Nothing
here retries; the caller decides from the per-item status and :class:`VendorCloudError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from .common import DeviceApiError, JsonClient, Wire, parse_retry_after
from .settings import BulkRestSettings

__all__ = [
    "MAX_COMMANDS_PER_BATCH",
    "MAX_RESULTS_PER_POST",
    "VendorBatch",
    "VendorBatchAnswer",
    "VendorCloudClient",
    "VendorCloudError",
    "VendorCommand",
    "VendorItemResult",
    "VendorResult",
    "VendorResults",
    "parse_retry_after",
]

MAX_COMMANDS_PER_BATCH = 1000
MAX_RESULTS_PER_POST = 500


class VendorCommand(Wire):
    device_id: str
    command_id: str
    type: str
    value: int | None = None
    percentage: int | None = None
    assets: list[str] | None = None
    revert_of: str | None = None
    response_token: str


class VendorBatch(Wire):
    response_url: str
    commands: list[VendorCommand] = Field(min_length=1, max_length=MAX_COMMANDS_PER_BATCH)


class VendorItemResult(Wire):
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


class VendorBatchAnswer(Wire):
    results: list[VendorItemResult]


class VendorResult(Wire):
    """What a device did with one accepted command, posted to the ``responseUrl``."""

    request_id: str
    command_id: str
    device_id: str
    result: Literal["SUCCEEDED", "FAILED"]
    message: str | None = None
    response_token: str


class VendorResults(Wire):
    results: list[VendorResult]


class VendorCloudError(DeviceApiError):
    """A whole vendor-cloud call failed (see :class:`~dercmd.protocols.common.DeviceApiError`)."""


class VendorCloudClient(JsonClient):
    """One vendor cloud, over a pool of keep-alive connections."""

    error = VendorCloudError

    async def send_commands(self, response_url: str, commands: Sequence[VendorCommand]) -> list[VendorItemResult]:
        """Send 1..1000 commands in one call; their results arrive later at ``response_url``.

        Returns one result per command, in the order given. Raises :class:`VendorCloudError`
        when the call as a whole failed, and pydantic's ``ValidationError`` (before sending
        anything) for no commands or more than 1000.
        """
        body = VendorBatch(response_url=response_url, commands=list(commands))
        answer = await self.call("/v1/commands:batch", body, VendorBatchAnswer)
        self.check_order([r.command_id for r in answer.results], [c.command_id for c in commands])
        return answer.results


class VendorCloudSettings(BulkRestSettings):
    model_config = SettingsConfigDict(env_prefix="DERCMD_VENDOR_CLOUD_", extra="ignore")
    SIMULATED = "vendor-cloud"

    token: str = Field("sim-vendor-secret", description="Bearer token dispatch presents to the vendor cloud.")
