"""Turning what was observed into figures, and printing them.

Definitions (all times wall clock on this one machine):

- **produced**: Kafka mode, when the bench called ``send`` for the request; REST mode, when
  the POST started.
- **Succeeded at**: the ``at`` of the command's ``Succeeded`` event on
  ``dercmd.commands.status``, stamped by dispatch when it published the result.
- **device received**: ``receivedAt`` of the simulator's receipt (``/sim/receipts``).
- **commands/s end to end** (burst): commands offered / (latest terminal ``at`` among them -
  first produced). Every command counts, whatever its terminal status; a command without
  one by the deadline makes the figure meaningless (the count is printed).
- **CPU s per 1,000 commands**: utime+stime a process used from just before the burst was
  produced until its last command was terminal, divided by burst size / 1,000. It includes
  what the process spends idle (consumers polling with a short fetch wait), which weighs
  more the slower or smaller the burst.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0-100), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def per_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}/s"


def machine() -> dict[str, Any]:
    model = "unknown"
    ram_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": model,
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{' (uncommitted changes)' if dirty else ''}"


def table(rows: Sequence[tuple[str, str]]) -> str:
    return grid(("figure", "value"), rows)


def grid(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def untruthful(terminal: Mapping[str, str], received: Mapping[str, object]) -> dict[str, int]:
    """Commands whose terminal status (command id -> status) disagrees with what the devices
    got (``received``: the command ids some device received)."""
    return {
        "succeeded_not_received": sum(1 for c, s in terminal.items() if s == "Succeeded" and c not in received),
        "failed_or_canceled_but_received": sum(1 for c, s in terminal.items() if s in ("Failed", "Canceled") and c in received),
    }
