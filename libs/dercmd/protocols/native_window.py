"""A device (or its maker's gateway) that keeps time windows itself, modelled on the batch
API of BRIEF 2.2: it takes a production limit for a window and returns to its default (100 %)
on its own when the window ends, so nobody has to send it a revert.

    POST {base}/v1/commands:batch    Authorization: Bearer <token>
        body NativeBatch {"commands": [NativeCommand, ...]}     1..100 commands
        -> 200 NativeBatchAnswer {"results": [NativeItemResult, ...]}
           one result per command, in request order: 201 stored on the device (and so carried
           out: the answer is the confirmation, nothing comes later), 404 unknown device,
           409 refused (an asset the device does not have, a window already over, ...)
        whole-request errors: 401 bad token, 400 malformed body, 429 rate limited (Retry-After), 5xx
    POST {base}/v1/commands:status   (:mod:`dercmd.protocols.common`): SUCCEEDED for a command a
        device stored, UNKNOWN for one it never got
    and the measurement reports of :mod:`dercmd.protocols.common` (subscription, request).

A ``LimitProductionPower`` command carries ``percentage`` (0..100), optionally a window
(``startAt`` .. ``endAt``: the device applies the limit in it and drops it at ``endAt``) and
``assetIdentifiers``: only those inverters behind the device are limited (none listed: all).
A device holds one limit per asset: a new command for an asset replaces what it held, so
``{"percentage": 100}`` without a window clears a window early. ``revertOf`` marks such a
clearing (informational). The other command types are carried out at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from .common import DeviceApiError, JsonClient, Wire
from .settings import BulkRestSettings

MAX_COMMANDS_PER_BATCH = 100


class NativeCommand(Wire):
    device_id: str
    command_id: str
    type: str
    value: int | None = None
    percentage: int | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    asset_identifiers: list[str] | None = None
    revert_of: str | None = None


class NativeBatch(Wire):
    commands: list[NativeCommand] = Field(min_length=1, max_length=MAX_COMMANDS_PER_BATCH)


class NativeItemResult(Wire):
    command_id: str
    status: int
    message: str | None = None

    @property
    def stored(self) -> bool:
        return self.status == 201

    @property
    def retriable(self) -> bool:
        return self.status == 429 or self.status >= 500


class NativeBatchAnswer(Wire):
    results: list[NativeItemResult]


class NativeWindowError(DeviceApiError):
    """A whole native-window call failed (see :class:`~dercmd.protocols.common.DeviceApiError`)."""


class NativeWindowClient(JsonClient):
    error = NativeWindowError

    async def send_commands(self, commands: Sequence[NativeCommand]) -> list[NativeItemResult]:
        """Send 1..100 commands in one call: one result per command, in the order given."""
        answer = await self.call("/v1/commands:batch", NativeBatch(commands=list(commands)), NativeBatchAnswer)
        self.check_order([r.command_id for r in answer.results], [c.command_id for c in commands])
        return answer.results


class NativeWindowSettings(BulkRestSettings):
    model_config = SettingsConfigDict(env_prefix="DERCMD_NATIVE_WINDOW_", extra="ignore")
    SIMULATED = "native-window"

    token: str = Field("sim-native-window-secret", description="Bearer token dispatch presents to the native-window backend.")
