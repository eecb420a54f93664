"""Backend ``vendor-cloud``: a device maker's cloud REST API (see
:mod:`dercmd.protocols.vendor_cloud`). Commands go in bulk, up to the protocol's batch size per
call; each device's result arrives later, in batches, at ``/callbacks/vendor-cloud``. The cloud
keeps no windows: a windowed limit is sent as "limit now", and its revert comes as a command of
its own. It answers what became of commands (delivery checks) and serves measurement reports."""

from __future__ import annotations

from collections.abc import Sequence

from dercmd.events import CommandType
from dercmd.fleet import Entity
from dercmd.protocols.vendor_cloud import MAX_COMMANDS_PER_BATCH, VendorCloudClient, VendorCommand
from dercmd.settings import Settings

from .base import Accepted, BackendError, CommandOutcome, Confirmation, Delivery, Finding, register
from .bulk_rest import BulkRestBackend, translate, translated

#: Path (under dispatch's callback base URL) where the vendor cloud posts results.
CALLBACK_PATH = "/callbacks/vendor-cloud"


class VendorCloudBackend(BulkRestBackend):
    name = "vendor-cloud"
    supported_types = frozenset(CommandType)
    max_batch = MAX_COMMANDS_PER_BATCH

    def __init__(self, client: VendorCloudClient, response_url: str) -> None:
        super().__init__(client)
        self._client: VendorCloudClient = client
        self._response_url = response_url

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
        out: list[Accepted | BackendError] = []
        for result in results:
            if result.accepted:
                out.append(Accepted(Confirmation.ASYNC, result.request_id))
            else:
                out.append(translate(result.retriable, f"HTTP {result.status}: {result.message or ''}"))
        return out

    async def outcomes(self, commands: Sequence[tuple[Entity, str]]) -> list[CommandOutcome]:
        out: list[CommandOutcome] = []
        with translated():
            for start in range(0, len(commands), MAX_COMMANDS_PER_BATCH):
                statuses = await self._client.command_status([c for _, c in commands[start : start + MAX_COMMANDS_PER_BATCH]])
                out += [CommandOutcome(Finding(s.status), s.message) for s in statuses]
        return out


@register("vendor-cloud")
def _create(settings: Settings) -> VendorCloudBackend:
    client = VendorCloudClient(settings.vendor_cloud_base_url, settings.vendor_cloud_token, timeout_s=settings.vendor_cloud_timeout_s)
    return VendorCloudBackend(client, settings.callback_base_url.rstrip("/") + CALLBACK_PATH)
