"""Backend ``vendor-cloud``: a device maker's cloud REST API (see
:mod:`dercmd.protocols.vendor_cloud`). Commands go in bulk, up to the protocol's batch size per
call; each device's result arrives later, in batches, at ``/callbacks/vendor-cloud`` (this
package's route on dispatch's server), each authenticated by the token dispatch gave with the
command. The cloud keeps no windows: a windowed limit is sent as "limit now", and its revert
comes as a command of its own. It answers what became of commands (an unknown delivery, a
delivery check) and serves measurement reports."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter
from dercmd.events import CommandType
from dercmd.protocols.vendor_cloud import (
    MAX_COMMANDS_PER_BATCH,
    VendorCloudClient,
    VendorCommand,
    VendorCloudSettings,
    VendorResults,
)

from ..base import (
    Accepted,
    BackendContext,
    BackendError,
    Capabilities,
    Confirmation,
    Delivery,
    register,
)
from ..bulk_rest import BulkRestBackend, item_error, translated
from ..callbacks import SignedResult, results_router

#: Path on dispatch's server where the vendor cloud posts results.
CALLBACK_PATH = "/callbacks/vendor-cloud"
#: Every command type, to devices of every kind; windows are the cloud's to ignore (dercmd reverts).
CAPABILITIES = Capabilities(types=frozenset(CommandType))


class VendorCloudBackend(BulkRestBackend):
    name = "vendor-cloud"
    supported_types = CAPABILITIES.types
    max_batch = MAX_COMMANDS_PER_BATCH

    def __init__(self, client: VendorCloudClient, context: BackendContext) -> None:
        super().__init__(client)
        self._client: VendorCloudClient = client
        self._response_url = context.callback_base_url.rstrip("/") + CALLBACK_PATH
        self.router = _results_router(context)

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]:
        commands = [
            VendorCommand(
                device_id=d.entity.device_id,
                command_id=d.order.command_id,
                type=d.order.type.value,
                value=d.order.value,
                percentage=d.order.percentage,
                assets=list(d.order.asset_identifiers) if d.order.asset_identifiers is not None else None,
                revert_of=d.order.revert_of,
                response_token=d.token,
            )
            for d in deliveries
        ]
        with translated():
            results = await self._client.send_commands(self._response_url, commands)
        return [Accepted(Confirmation.ASYNC, r.request_id) if r.accepted else item_error(r.status, r.message) for r in results]


def _results_router(context: BackendContext) -> APIRouter:
    return results_router(CALLBACK_PATH, VendorResults, lambda body: [SignedResult(r.response_token, r.command_id, r.result == "SUCCEEDED", r.message) for r in body.results], context)


@register("vendor-cloud", VendorCloudSettings, CAPABILITIES)
def _create(context: BackendContext) -> VendorCloudBackend:
    settings = VendorCloudSettings()
    client = VendorCloudClient(settings.base_url(context.settings), settings.token, timeout_s=settings.timeout_s)
    return VendorCloudBackend(client, context)
