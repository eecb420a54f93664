"""CPU time of processes, from ``/proc/<pid>/stat`` (Linux)."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 of proc(5), the
    state, comes first), or None if the process is gone (or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: fields after its closing parenthesis.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process in seconds, or None if it is gone (or not Linux)."""
    fields = stat(pid)
    if fields is None:
        return None
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


def parent(pid: int) -> int | None:
    """The parent's pid (field 4 of proc(5)), or None if the process is gone."""
    fields = stat(pid)
    return int(fields[1]) if fields is not None else None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent's reaper."""
    fields = stat(pid)
    return fields is not None and fields[0] != "Z"


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: s for name, pid in pids.items() if (s := cpu_seconds(pid)) is not None}
