"""Curtailment batches (BRIEF 2.2) from the CLI: the requests either form of ``dercmd batch``
describes, and sending them so that one refused request neither hides nor stops the others."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import inputs
from .client import Api, ApiError, CliError, call


def requests(file: str | None, percentage: int | None, start: str, end: str | None,
             devices: str | None, assets: list[str] | None) -> list[dict[str, Any]]:
    """The batch requests of either form: a file, or the convenience options."""
    if file is not None:
        if percentage is not None or end is not None or devices is not None or assets:
            raise inputs.usage("give either FILE or --percentage/--end/--devices/--asset, not both")
        return inputs.batch_requests(inputs.parse_document(inputs.read_text(file), file))
    if percentage is None or end is None or devices is None:
        raise inputs.usage("give FILE, or --percentage, --end and --devices (and --start, default now)")
    return inputs.cut(inputs.curtailment(percentage, start, end, assets), inputs.read_devices(devices))


@dataclass
class Sent:
    """What each request (by index) got: its commands, or the error that refused it."""

    requests: list[dict[str, Any]]
    answers: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    refused: dict[int, CliError] = field(default_factory=dict)
    skipped: int = 0  # not sent: the first request was refused

    def commands(self) -> list[dict[str, Any]]:
        """``{"deviceHashId", "id"}`` of every command accepted, in the order of the requests."""
        return [c for i in sorted(self.answers) for c in self.answers[i]]

    def refusals(self) -> list[dict[str, Any]]:
        """Each refused request (1-based), its devices and the API's error, for ``--json``."""
        return [{"request": i + 1, "deviceHashIds": self.requests[i]["deviceHashIds"],
                 **(e.body if isinstance(e, ApiError) else {"key": "unreachable", "message": e.message})}
                for i, e in sorted(self.refused.items())]

    def refusal_groups(self) -> list[tuple[CliError, str]]:
        """Each distinct refusal once, with the requests it refused: a broken batch of 1,000
        requests reads as a few lines."""
        groups: dict[str, list[int]] = {}
        for i, error in sorted(self.refused.items()):
            groups.setdefault(error.message, []).append(i)
        where = []
        for numbers in groups.values():
            shown = ", ".join(str(i + 1) for i in numbers[:10]) + (", ..." if len(numbers) > 10 else "")
            text = f"request{'s' if len(numbers) > 1 else ''} {shown} of {len(self.requests)}"
            if self.skipped:
                text += f"; the other {self.skipped} were not sent"
            where.append((self.refused[numbers[0]], text))
        return where

    def summary(self, out: Path | None) -> str:
        commands = self.commands()
        devices = sum(len(r["deviceHashIds"]) for r in self.requests)
        text = (f"{len(commands)} commands accepted for {devices} devices "
                f"({len(self.answers)} of {len(self.requests)} requests)")
        if out is not None and commands:
            text += f"; ids saved to {out}: dercmd watch {out}"
        elif commands:
            text += "; ids not saved (--out FILE keeps them for dercmd watch)"
        return text


async def send(api: Api, batch: list[dict[str, Any]], concurrency: int) -> Sent:
    """Send every request, the first alone: a mistake they all share (a time in the past, a bad
    percentage) is then reported once and nothing else is sent. A refused request later on
    does not stop the others."""
    sent = Sent(batch)
    gate = asyncio.Semaphore(concurrency)
    async with api.client(concurrency) as client:

        async def one(i: int) -> None:
            async with gate:
                try:
                    answer = await call(client, "POST", "/v1/command/", json=batch[i])
                    sent.answers[i] = answer["commands"]
                except CliError as exc:
                    sent.refused[i] = exc

        await one(0)
        if sent.refused:
            sent.skipped = len(batch) - 1
        else:
            await asyncio.gather(*(one(i) for i in range(1, len(batch))))
    return sent
