"""A device maker's cloud API, the common shape of EV, charge-point and inverter clouds:
bearer-token auth, one POST per command answered at once with ACCEPTED (or an error), and
the device's result delivered later to a ``responseUrl`` the caller chose (as OCPI commands do).

    POST {base}/v1/devices/{deviceId}/commands   Authorization: Bearer <token>
        body VendorCommand           -> 202 VendorAccepted
        401 bad token, 404 unknown device, 409 device refused, 429 rate limited (Retry-After), 5xx
    later: POST {responseUrl}  body VendorResult
"""

from __future__ import annotations

from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class VendorCommand(_Wire):
    command_id: str
    type: str
    value: int | None = None
    response_url: str


class VendorAccepted(_Wire):
    request_id: str
    result: Literal["ACCEPTED"] = "ACCEPTED"


class VendorResult(_Wire):
    request_id: str
    command_id: str
    device_id: str
    result: Literal["SUCCEEDED", "FAILED"]
    message: str | None = None


class VendorCloudError(Exception):
    """A call failed. ``retriable`` says whether the same call may succeed later."""

    def __init__(self, message: str, *, status: int | None = None, retriable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = retriable


class VendorCloudClient:
    def __init__(self, base_url: str, token: str, *, timeout_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send_command(self, device_id: str, command: VendorCommand) -> VendorAccepted:
        try:
            response = await self._http.post(
                f"/v1/devices/{device_id}/commands", json=command.model_dump(by_alias=True, exclude_none=True)
            )
        except httpx.TimeoutException as exc:
            # The request may have reached the device: the caller must not assume it did not.
            raise VendorCloudError(f"timeout: {exc!r}", retriable=True) from exc
        except httpx.TransportError as exc:
            raise VendorCloudError(f"transport: {exc!r}", retriable=True) from exc
        if response.status_code == 202:
            return VendorAccepted.model_validate(response.json())
        retriable = response.status_code == 429 or response.status_code >= 500
        raise VendorCloudError(
            f"HTTP {response.status_code}: {response.text[:300]}", status=response.status_code, retriable=retriable
        )
