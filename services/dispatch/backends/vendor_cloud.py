"""Backend ``vendor-cloud``: a device maker's cloud REST API (see
:mod:`dercmd.protocols.vendor_cloud`). Commands go in bulk, up to the protocol's batch size per
call; each device's result arrives later, in batches, at ``/callbacks/vendor-cloud``."""

from __future__ import annotations

from collections.abc import Sequence

from dercmd.events import CommandType
from dercmd.protocols.vendor_cloud import VendorCloudClient, VendorCloudError, VendorCommand
from dercmd.settings import Settings

from .base import Accepted, BackendError, Confirmation, Delivery, PermanentBackendError, TransientBackendError, register

#: Path (under dispatch's callback base URL) where the vendor cloud posts results.
CALLBACK_PATH = "/callbacks/vendor-cloud"


class VendorCloudBackend:
    name = "vendor-cloud"
    supported_types = frozenset(CommandType)
    max_batch = 1000

    def __init__(self, client: VendorCloudClient, response_url: str) -> None:
        self._client = client
        self._response_url = response_url

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]:
        commands = [
            VendorCommand(
                device_id=d.entity.device_id,
                command_id=d.order.command_id,
                type=d.order.type.value,
                value=d.order.value,
                response_token=d.token,
            )
            for d in deliveries
        ]
        try:
            results = await self._client.send_commands(self._response_url, commands)
        except VendorCloudError as exc:
            raise _translate(exc.retriable, str(exc)) from exc
        out: list[Accepted | BackendError] = []
        for result in results:
            if result.accepted:
                out.append(Accepted(Confirmation.ASYNC, result.request_id))
            else:
                out.append(_translate(result.retriable, f"HTTP {result.status}: {result.message or ''}"))
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def _translate(retriable: bool, detail: str) -> BackendError:
    if retriable:
        return TransientBackendError("backend_unavailable", detail)
    return PermanentBackendError("backend_refused", detail)


@register("vendor-cloud")
def _create(settings: Settings) -> VendorCloudBackend:
    client = VendorCloudClient(settings.vendor_cloud_base_url, settings.vendor_cloud_token, timeout_s=settings.vendor_cloud_timeout_s)
    return VendorCloudBackend(client, settings.callback_base_url.rstrip("/") + CALLBACK_PATH)
