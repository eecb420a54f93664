"""``dercmd``: the operator's command line. ``dercmd run`` starts the local stack (``make run``);
the other commands talk to a running API: send, schedule and cancel commands, send curtailment
batches, and watch what share of a batch succeeded.

Every API error is printed as ``key: message`` and ends the command with a non-zero exit code,
never a traceback. Exit codes: 0 done; 1 the API refused or could not be reached; 2 bad usage;
``watch`` and ``send --wait``: 3 finished but not all Succeeded, 4 time ran out with commands
still open, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.live import Live
from rich.text import Text

from . import batches, inputs, progress
from .client import DEFAULT_TOKEN, DEFAULT_URL, EXIT_ERROR, Api, CliError, call, path
from .output import Output, command_table, commands_table, settings_table
from .settings import every_setting
from dercmd.protocols.ocpp import hash_password

T = TypeVar("T")

app = typer.Typer(
    name="dercmd",
    help="dercmd run starts the local stack (make run); the other commands talk to a running API. "
         "Exit codes: 0 done, 1 refused or unreachable, 2 bad usage; watch and send --wait: "
         "3 finished but not all Succeeded, 4 still open when time ran out, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # locals would show the bearer token
)


@dataclass
class Cli:
    """What every command needs: where the API is, and how to print."""

    api: Api
    out: Output

    def run(self, work: Coroutine[Any, Any, int | None]) -> None:
        """Run a command's coroutine; its errors become a line on stderr and an exit code."""
        try:
            code = asyncio.run(work)
        except CliError as exc:
            self.out.error(exc)
            raise typer.Exit(exc.code) from None
        if code:
            raise typer.Exit(code)


@app.callback()
def options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="DERCMD_API_URL", help="base URL of the dercmd REST API")] = DEFAULT_URL,
    token: Annotated[str, typer.Option(
        envvar="DERCMD_TOKEN", help="bearer token (the example fleet's by default)")] = DEFAULT_TOKEN,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON instead of tables (for scripts)")] = False,
) -> None:
    """Global options go before the command: dercmd --json show ID."""
    # A transport handed in as the context object replaces the network (tests).
    ctx.obj = Cli(Api(url.rstrip("/"), token, transport=ctx.obj), Output(as_json))


@app.command()
def run() -> None:
    """Start everything on this machine, as make run does: a broker and Redis if none is
    configured, every service and the simulator with the example fleet. Ctrl-C stops it all."""
    from .. import launcher  # only here: it imports Kafka and Redis clients, slow for the other commands

    raise typer.Exit(launcher.run())


Interval = Annotated[float, typer.Option(min=0.05, metavar="SECONDS", help="seconds between polling rounds")]


@app.command()
def send(
    ctx: typer.Context,
    entity: Annotated[str, typer.Argument(metavar="ENTITY", help="entity id, e.g. ev-1")],
    type_: Annotated[str, typer.Argument(
        metavar="TYPE", help="StartCharging, StopCharging, Reset, Disconnect, LimitFeedIn, StopFeedIn, ...")],
    value: Annotated[int | None, typer.Option(metavar="N", help="the type's value (LimitFeedIn: watts)")] = None,
    percentage: Annotated[int | None, typer.Option(
        metavar="N", help="the type's percentage (LimitProductionPower)")] = None,
    ignore_cooldown: Annotated[bool, typer.Option(
        "--ignore-cooldown", help="send even inside the entity's cooldown (audited)")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait for a terminal status and show it")] = False,
    timeout: Annotated[float, typer.Option(
        min=0, metavar="SECONDS", help="with --wait: seconds to wait at most")] = 60.0,
) -> None:
    """Send a command to one entity now (POST /v1/entities/{entityId}/commands)."""
    cli: Cli = ctx.obj
    body = {"type": type_} | ({"value": value} if value is not None else {}) | (
        {"percentage": percentage} if percentage is not None else {})
    params = {"ignoreCooldown": "true"} if ignore_cooldown else {}

    async def work() -> int | None:
        async with cli.api.client() as client:
            command = await call(client, "POST", path("/v1/entities/{}/commands", entity), json=body, params=params)
        if not wait:
            cli.out.result(command, command_table)
            return None
        cli.out.note(f"{command['id']} is {command['status']}; waiting up to {timeout:g} s for a terminal status")
        tally = progress.Tally([command["id"]])
        tally.states[command["id"]] = command
        await progress.follow(cli.api, tally, seconds=timeout, interval_s=0.25)
        cli.out.result(tally.states[command["id"]], command_table)
        return tally.exit_code()

    cli.run(work())


@app.command()
def schedule(
    ctx: typer.Context,
    entity: Annotated[str, typer.Argument(metavar="ENTITY", help="entity id")],
    items: Annotated[str, typer.Argument(
        metavar="FILE_OR_JSON",
        help='a JSON/YAML file (- for stdin) or inline JSON: [{"triggerTime": "+10m", "type": T, "value": V?}, ...]')],
) -> None:
    """Schedule commands for one entity (POST /v1/entities/{entityId}/commands/schedule).
    triggerTime: ISO 8601 with a zone, or +10s, +5m, +1h from now."""
    cli: Cli = ctx.obj
    body = _parsed(cli, lambda: inputs.schedule_body(inputs.file_or_inline(items)))

    async def work() -> None:
        async with cli.api.client() as client:
            answer = await call(client, "POST", path("/v1/entities/{}/commands/schedule", entity), json=body)
        cli.out.result(answer, lambda a: commands_table(a["commands"]))

    cli.run(work())


@app.command()
def batch(
    ctx: typer.Context,
    file: Annotated[str | None, typer.Argument(
        metavar="FILE", help="JSON/YAML file (- for stdin): one POST /v1/command/ body or a list of them")] = None,
    percentage: Annotated[int | None, typer.Option(
        metavar="N", help="limit production to this percentage (0..100)")] = None,
    start: Annotated[str, typer.Option(metavar="TIME", help="startAt: ISO 8601 with a zone, or +10s, +5m, +1h")] = "+0s",
    end: Annotated[str | None, typer.Option(metavar="TIME", help="endAt: as --start")] = None,
    devices: Annotated[str | None, typer.Option(
        metavar="FILE", help="file of device ids (one a line, or a JSON list; - for stdin)")] = None,
    asset: Annotated[list[str] | None, typer.Option(metavar="ID", help="only these assets (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(metavar="FILE", help="save the command ids, for dercmd watch")] = None,
    watch: Annotated[float | None, typer.Option(min=0, metavar="SECONDS", help="then watch progress this long")] = None,
    interval: Interval = 1.0,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="batch requests in flight at once")] = 8,
) -> None:
    """Send curtailment batches (POST /v1/command/), cut into requests of 100 devices.

    From a file, or: dercmd batch --percentage 30 --start +10s --end +1h --devices ids.txt"""
    cli: Cli = ctx.obj
    requests = _parsed(cli, lambda: batches.requests(file, percentage, start, end, devices, asset))

    async def work() -> int | None:
        sent = await batches.send(cli.api, requests, concurrency)
        commands = sent.commands()
        if out is not None and commands:
            inputs.write_ids(out, commands)
        report = {"commands": commands, "refused": sent.refusals()}
        for error, where in sent.refusal_groups():
            cli.out.error(error, where)
        cli.out.note(sent.summary(out))
        code = progress.EXIT_ALL_SUCCEEDED
        if watch is not None and commands:
            tally = progress.Tally(c["id"] for c in commands)
            await _watch(cli, tally, watch, interval, concurrency=32)
            report["watch"] = tally.report()
            code = tally.exit_code()
            if not cli.out.as_json:
                cli.out.console.print(progress.final_view(tally))
        if cli.out.as_json:
            cli.out.result(report, lambda r: r)
        return EXIT_ERROR if sent.refused else code

    cli.run(work())


@app.command(name="watch")
def watch_(
    ctx: typer.Context,
    ids_file: Annotated[str, typer.Argument(
        metavar="IDS_FILE", help="command ids: what batch --out saved, a JSON list, or one a line")],
    seconds: Annotated[float | None, typer.Option(
        min=0, metavar="N", help="stop after this many seconds (default: when all finished)")] = None,
    interval: Interval = 1.0,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="GET requests in flight at once")] = 32,
) -> None:
    """Live progress of a batch: shares Succeeded / Failed / Canceled / open over time, then
    failure reasons. Exit 0 all Succeeded, 3 finished otherwise, 4 still open, 130 interrupted."""
    cli: Cli = ctx.obj
    tally = progress.Tally(_parsed(cli, lambda: inputs.read_ids(ids_file)))

    async def work() -> int:
        await _watch(cli, tally, seconds, interval, concurrency)
        _show_final(cli, tally)
        return tally.exit_code()

    try:
        cli.run(work())
    except KeyboardInterrupt:
        _show_final(cli, tally)
        raise typer.Exit(progress.EXIT_INTERRUPTED) from None


@app.command()
def show(ctx: typer.Context, command_id: Annotated[str, typer.Argument(metavar="ID", help="command id")]) -> None:
    """One command's state, every field (GET /v1/commands/{id})."""
    _one(ctx.obj, "GET", command_id)


@app.command()
def cancel(ctx: typer.Context, command_id: Annotated[str, typer.Argument(metavar="ID", help="command id")]) -> None:
    """Cancel a command that has not finished (DELETE /v1/commands/{id})."""
    _one(ctx.obj, "DELETE", command_id)


@app.command(name="ocpp-password")
def ocpp_password(ctx: typer.Context, charge_point_id: Annotated[str, typer.Argument(metavar="ID", help="the charge point's id")]) -> None:
    """A new OCPP password for a charge point (security profile 1): set the password on the
    charger (its AuthorizationKey) and the hash in the fleet file (ocppPasswordHash)."""
    password = secrets.token_urlsafe(24)  # 32 characters, within OCPP's 16 to 40
    ctx.obj.out.result({"chargePointId": charge_point_id, "password": password, "ocppPasswordHash": hash_password(password)},
                       lambda r: Text(f"password (on the charger):      {r['password']}\n"
                                      f"ocppPasswordHash (fleet file):  {r['ocppPasswordHash']}", no_wrap=True, overflow="ignore"))


@app.command(name="settings")
def settings_(ctx: typer.Context) -> None:
    """Every DERCMD_* variable (each service's, each device backend's), its default and what it
    does, read from the code (--json: one object per variable)."""
    rows = [{"variable": name, "default": default, "description": text} for name, default, text in every_setting()]
    ctx.obj.out.result(rows, settings_table)


def _one(cli: Cli, method: str, command_id: str) -> None:
    async def work() -> None:
        async with cli.api.client() as client:
            command = await call(client, method, path("/v1/commands/{}", command_id))
        cli.out.result(command, command_table)

    cli.run(work())


def _parsed(cli: Cli, parse: Callable[[], T]) -> T:
    """Input parsed before anything is sent; a mistake in it is a usage error."""
    try:
        return parse()
    except CliError as exc:
        cli.out.error(exc)
        raise typer.Exit(exc.code) from None


async def _watch(cli: Cli, tally: progress.Tally, seconds: float | None, interval: float, concurrency: int) -> None:
    """Follow the tally, with a live view that goes when done (none with --json)."""
    if cli.out.as_json:
        await progress.follow(cli.api, tally, seconds=seconds, interval_s=interval, concurrency=concurrency)
        return
    with Live(progress.live_view(tally), console=cli.out.console, refresh_per_second=4, transient=True) as live:
        await progress.follow(cli.api, tally, seconds=seconds, interval_s=interval, concurrency=concurrency,
                              on_round=lambda t: live.update(progress.live_view(t)))


def _show_final(cli: Cli, tally: progress.Tally) -> None:
    cli.out.result(tally.report(), lambda r: progress.final_view(tally))


def main() -> None:
    """The ``dercmd`` console script."""
    app()
