"""Backend ``native-window``: devices that keep time windows themselves (see
:mod:`dercmd.protocols.native_window`). A windowed limit goes once, with its start, end and
assets, and the device returns to its default at the end on its own; a revert (a window
cancelled early) clears it. Each answer is the device's confirmation (Confirmation.SYNC): the
device stores the command before it answers and there is no later result to wait for, so
nothing of it can stay ``Sent``. It says whether a device stored a command (an answer that was
lost), and serves measurement reports."""

from __future__ import annotations

from collections.abc import Sequence

from dercmd.events import CommandType
from dercmd.protocols.native_window import MAX_COMMANDS_PER_BATCH, NativeCommand, NativeWindowClient, NativeWindowSettings

from ..base import Accepted, BackendContext, BackendError, Capabilities, Confirmation, Delivery, register
from ..bulk_rest import BulkRestBackend, item_error, translated

#: Every command type; its devices keep time windows themselves (no revert from dercmd).
CAPABILITIES = Capabilities(types=frozenset(CommandType), native_windows=True)


class NativeWindowBackend(BulkRestBackend):
    name = "native-window"
    supported_types = CAPABILITIES.types
    max_batch = MAX_COMMANDS_PER_BATCH

    def __init__(self, client: NativeWindowClient) -> None:
        super().__init__(client)
        self._client: NativeWindowClient = client

    async def send(self, deliveries: Sequence[Delivery]) -> list[Accepted | BackendError]:
        commands = [
            NativeCommand(
                device_id=d.entity.device_id,
                command_id=d.order.command_id,
                type=d.order.type.value,
                value=d.order.value,
                percentage=d.order.percentage,
                start_at=d.order.start_at,
                end_at=d.order.end_at,
                asset_identifiers=list(d.order.asset_identifiers) if d.order.asset_identifiers is not None else None,
                revert_of=d.order.revert_of,
            )
            for d in deliveries
        ]
        with translated():
            results = await self._client.send_commands(commands)
        return [Accepted(Confirmation.SYNC) if r.stored else item_error(r.status, r.message) for r in results]


@register("native-window", NativeWindowSettings, CAPABILITIES)
def _create(context: BackendContext) -> NativeWindowBackend:
    settings = NativeWindowSettings()
    return NativeWindowBackend(NativeWindowClient(settings.base_url(context.settings), settings.token, timeout_s=settings.timeout_s))
