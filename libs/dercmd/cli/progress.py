"""Batch progress (BRIEF 6): what share of a batch's commands succeeded, failed, were canceled
or are still open after N seconds, and why those that failed did.

It polls ``GET /v1/commands/{id}`` for every command not yet finished, a bounded number in
flight, a round at a time; a command that reached a terminal status is never asked again.
Seconds count from the start of the watch (``batch --watch`` starts it as the batch is taken).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .client import Api, ApiError, CliError, call, path
from .output import STATUS_STYLE

OPEN = ("Pending", "Triggered", "Sent")
TERMINAL = ("Succeeded", "Failed", "Canceled", "Rejected")
NOT_FOUND = "NotFound"  # 404: no such command, or this token may not see it; asked no more
UNKNOWN = "Unknown"  # no answer yet
FINISHED = (*TERMINAL, NOT_FOUND)
#: The rows of the progress table: a label and the statuses it counts.
ROWS = (("Succeeded", ("Succeeded",)), ("Failed", ("Failed",)), ("Canceled", ("Canceled",)),
        ("Rejected", ("Rejected",)), ("open", OPEN), (NOT_FOUND, (NOT_FOUND,)), (UNKNOWN, (UNKNOWN,)))
#: Rows shown even at zero; the others only when some command is in them.
ALWAYS = ("Succeeded", "Failed", "Canceled", "open")
#: Times at which the timeline shows the shares (and at the watch's last round).
CHECKPOINTS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

#: Exit codes of ``watch`` (and ``send --wait``).
EXIT_ALL_SUCCEEDED = 0
EXIT_NOT_ALL_SUCCEEDED = 3  # all finished, some not Succeeded
EXIT_STILL_OPEN = 4  # time ran out with commands still open
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Snapshot:
    elapsed_s: float
    counts: Counter[str]


class Tally:
    """The latest known state of every watched command, and the counts after each round."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.states: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
        self.snapshots: list[Snapshot] = []
        self.last_error: str | None = None  # of the latest round: shown, and the watch goes on
        self.fatal: ApiError | None = None  # 401/403: no use asking again

    @property
    def total(self) -> int:
        return len(self.states)

    def status(self, command_id: str) -> str:
        state = self.states[command_id]
        return str(state.get("status", UNKNOWN)) if state else UNKNOWN

    def open_ids(self) -> list[str]:
        return [i for i in self.states if self.status(i) not in FINISHED]

    def counts(self) -> Counter[str]:
        return Counter(self.status(i) for i in self.states)

    @property
    def elapsed_s(self) -> float:
        return self.snapshots[-1].elapsed_s if self.snapshots else 0.0

    def record(self, elapsed_s: float) -> None:
        self.snapshots.append(Snapshot(elapsed_s, self.counts()))

    def at(self, seconds: float) -> Snapshot | None:
        """The counts as they were after ``seconds`` (the last round that ended by then)."""
        i = bisect.bisect_right([s.elapsed_s for s in self.snapshots], seconds)
        return self.snapshots[i - 1] if i else None

    def reasons(self) -> list[tuple[str, str, int, str]]:
        """(status, reason, how many, one detail) of the commands that finished otherwise than
        Succeeded, most frequent first."""
        groups: Counter[tuple[str, str]] = Counter()
        details: dict[tuple[str, str], str] = {}
        for state in self.states.values():
            if state and state.get("status") in FINISHED and state["status"] != "Succeeded":
                key = (state["status"], str(state.get("reason") or "-"))
                groups[key] += 1
                details.setdefault(key, str(state.get("detail") or ""))
        return [(status, reason, n, details[status, reason]) for (status, reason), n in groups.most_common()]

    def exit_code(self) -> int:
        counts = self.counts()
        if counts["Succeeded"] == self.total:
            return EXIT_ALL_SUCCEEDED
        return EXIT_STILL_OPEN if self.open_ids() else EXIT_NOT_ALL_SUCCEEDED

    def timeline(self) -> list[Snapshot]:
        """The counts at each checkpoint passed, and at the end."""
        passed = [self.at(c) for c in CHECKPOINTS_S if c < self.elapsed_s]
        return [s for s in passed if s is not None] + self.snapshots[-1:]

    def report(self) -> dict[str, Any]:
        """Everything the final view shows, for ``--json``."""
        counts = self.counts()
        return {
            "total": self.total,
            "afterS": round(self.elapsed_s, 3),
            "finished": not self.open_ids(),
            "counts": dict(counts),
            "shares": shares(counts, self.total),
            "timeline": [
                {"afterS": round(s.elapsed_s, 3), "counts": dict(s.counts), "shares": shares(s.counts, self.total)}
                for s in self.timeline()
            ],
            "reasons": [{"status": s, "reason": r, "count": n, "detail": d} for s, r, n, d in self.reasons()],
        }


def shares(counts: Counter[str], total: int) -> dict[str, float]:
    return {status: round(n / total, 4) for status, n in counts.items()} if total else {}


async def follow(api: Api, tally: Tally, *, seconds: float | None = None, interval_s: float = 1.0,
                 concurrency: int = 32, on_round: Callable[[Tally], None] = lambda tally: None) -> None:
    """Poll the open commands, a round at a time, until none is open or ``seconds`` passed
    (None: no limit). A round cut short by the deadline keeps the answers it got."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = None if seconds is None else started + seconds
    gate = asyncio.Semaphore(concurrency)
    async with api.client(concurrency) as client:

        async def poll(command_id: str) -> None:
            async with gate:
                if tally.fatal:
                    return
                try:
                    tally.states[command_id] = await call(client, "GET", path("/v1/commands/{}", command_id))
                except ApiError as exc:
                    if exc.status == 404:
                        tally.states[command_id] = {"id": command_id, "status": NOT_FOUND, "reason": exc.key}
                    elif exc.status in (401, 403):
                        tally.fatal = exc
                    else:
                        tally.last_error = exc.message
                except CliError as exc:
                    tally.last_error = exc.message

        while True:
            tally.last_error = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.gather(*(poll(i) for i in tally.open_ids()))
            if tally.fatal:
                raise tally.fatal
            tally.record(loop.time() - started)
            on_round(tally)
            if not tally.open_ids() or (deadline is not None and loop.time() >= deadline):
                return
            await asyncio.sleep(interval_s if deadline is None else min(interval_s, deadline - loop.time()))


def _row_counts(counts: Counter[str]) -> list[tuple[str, int, tuple[str, ...]]]:
    return [(label, sum(counts[s] for s in statuses), statuses) for label, statuses in ROWS
            if label in ALWAYS or any(counts[s] for s in statuses)]


def status_table(tally: Tally) -> Table:
    """Counts and shares now, a bar each; ``open`` says how many are at each open stage."""
    counts, total = tally.counts(), tally.total
    finished = total - len(tally.open_ids())
    table = Table(title=f"{finished} of {total} finished after {tally.elapsed_s:.1f} s", title_justify="left")
    for name in ("status", "count", "share", "", "of which"):
        table.add_column(name, justify="right" if name in ("count", "share") else "left")
    for label, n, statuses in _row_counts(counts):
        style = STATUS_STYLE.get(label, "white")
        parts = " · ".join(f"{s} {counts[s]}" for s in statuses if counts[s]) if label == "open" else ""
        table.add_row(Text(label, style=style), str(n), f"{n / total:.1%}" if total else "-",
                      ProgressBar(total=max(total, 1), completed=n, width=30, complete_style=style), parts)
    return table


def timeline_table(tally: Tally) -> Table:
    """The shares at 1, 2, 5, 10, 30, ... seconds and at the end."""
    table = Table(title="shares over time", title_justify="left")
    table.add_column("after", justify="right")
    labels = [label for label, _, _ in _row_counts(tally.counts())]
    for label in labels:
        table.add_column(label, justify="right", style=STATUS_STYLE.get(label, ""))
    for snapshot in tally.timeline():
        by_label = {label: n for label, n, _ in _row_counts(snapshot.counts)}
        table.add_row(f"{snapshot.elapsed_s:.1f} s",
                      *(f"{by_label.get(label, 0) / tally.total:.1%}" for label in labels))
    return table


def reasons_table(tally: Tally) -> Table:
    table = Table("status", "reason", "count", "detail (one of them)", title="why not Succeeded",
                  title_justify="left")
    for status, reason, n, detail in tally.reasons():
        table.add_row(Text(status, style=STATUS_STYLE.get(status, "")), reason, str(n), detail)
    return table


def live_view(tally: Tally) -> RenderableType:
    parts: list[RenderableType] = [status_table(tally)]
    if tally.last_error:
        parts.append(Text(f"last round: {tally.last_error}", style="yellow"))
    return Group(*parts)


def final_view(tally: Tally) -> RenderableType:
    parts: list[RenderableType] = [status_table(tally), timeline_table(tally)]
    if tally.reasons():
        parts.append(reasons_table(tally))
    if tally.open_ids():
        still = len(tally.open_ids())
        parts.append(Text(f"{still} still open: run dercmd watch again to follow them", style="yellow"))
    return Group(*parts)
