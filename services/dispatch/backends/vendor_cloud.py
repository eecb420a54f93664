"""Backend ``vendor-cloud``: a device maker's cloud REST API (see
:mod:`dercmd.protocols.vendor_cloud`); the result arrives asynchronously at the callback URL."""

from __future__ import annotations

from dercmd.events import CommandType, DispatchOrderV1
from dercmd.fleet import Entity
from dercmd.protocols.vendor_cloud import VendorCloudClient, VendorCloudError, VendorCommand
from dercmd.settings import Settings

from .base import Accepted, Confirmation, PermanentBackendError, TransientBackendError, register


class VendorCloudBackend:
    name = "vendor-cloud"
    supported_types = frozenset(CommandType)

    def __init__(self, client: VendorCloudClient) -> None:
        self._client = client

    async def send(self, order: DispatchOrderV1, entity: Entity, callback_url: str) -> Accepted:
        command = VendorCommand(command_id=order.command_id, type=order.type.value, value=order.value, response_url=callback_url)
        try:
            accepted = await self._client.send_command(entity.device_id, command)
        except VendorCloudError as exc:
            error = TransientBackendError if exc.retriable else PermanentBackendError
            reason = "backend_unavailable" if exc.retriable else "backend_refused"
            raise error(reason, str(exc)) from exc
        return Accepted(Confirmation.ASYNC, accepted.request_id)

    async def aclose(self) -> None:
        await self._client.aclose()


@register("vendor-cloud")
def _create(settings: Settings) -> VendorCloudBackend:
    return VendorCloudBackend(
        VendorCloudClient(settings.vendor_cloud_base_url, settings.vendor_cloud_token, timeout_s=settings.vendor_cloud_timeout_s)
    )
