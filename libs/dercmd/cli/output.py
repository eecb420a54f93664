"""How results reach the operator: rich tables on a terminal, or the API's raw JSON with
``--json`` for scripts. Results go to stdout; errors and notes to stderr, so stdout stays
parseable."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from .client import CliError

#: The order fields of a command are shown in; fields not listed follow, by name.
FIELDS = (
    "id", "entityId", "deviceHashId", "status", "type", "value", "percentage", "triggerTime", "startAt",
    "endAt", "assetIdentifiers", "expiresAt", "reason", "detail", "cooldownUntil", "supersededBy",
    "revertOf", "source", "ignoreCooldown", "createdAt", "acceptedAt", "triggeredAt", "sentAt",
    "confirmedAt", "updatedAt",
)
STATUS_STYLE = {
    "Pending": "cyan", "Triggered": "blue", "Sent": "magenta", "Succeeded": "green",
    "Failed": "red", "Canceled": "yellow", "Rejected": "red", "NotFound": "red", "Unknown": "dim",
}


def ordered(names: Iterable[str]) -> list[str]:
    present = set(names)
    return [f for f in FIELDS if f in present] + sorted(present - set(FIELDS))


def cell(name: str, value: Any) -> Text:
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    return Text(str(value), style=STATUS_STYLE.get(str(value), "") if name == "status" else "")


def command_table(command: dict[str, Any]) -> Table:
    """One command, a field per row: every field the API returned."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name in ordered(command):
        table.add_row(name, cell(name, command[name]))
    return table


def commands_table(commands: list[dict[str, Any]]) -> Table:
    """Several commands, one per row, with the columns any of them has."""
    columns = ordered({name for c in commands for name in c})
    table = Table(*columns)
    for command in commands:
        table.add_row(*(cell(name, command.get(name, "")) for name in columns))
    return table


def settings_table(rows: list[dict[str, str]]) -> Table:
    """``dercmd settings``: one variable per row."""
    table = Table("variable", "default", "what it does")
    for row in rows:
        table.add_row(row["variable"], row["default"], row["description"], style=None)
    return table


@dataclass
class Output:
    as_json: bool = False
    console: Console = field(default_factory=Console)
    stderr: Console = field(default_factory=lambda: Console(stderr=True, highlight=False, soft_wrap=True))

    def result(self, data: Any, render: Callable[[Any], RenderableType]) -> None:
        """``data`` as JSON, or as ``render`` draws it."""
        if self.as_json:
            typer.echo(json.dumps(data, indent=2))
        else:
            self.console.print(render(data))

    def note(self, message: str) -> None:
        """Something the operator should know that is not the result (stderr)."""
        if not self.as_json:
            self.stderr.print(message, markup=False)

    def error(self, error: CliError, where: str = "") -> None:
        """``key: message`` (and where, e.g. which batch requests), then each detail."""
        self.stderr.print(Text(f"{error.message} ({where})" if where else error.message, style="bold red"))
        for line in error.details:
            self.stderr.print(f"  {line}", markup=False)
