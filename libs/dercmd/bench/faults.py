"""``python -m dercmd.bench.faults`` / ``make faults``: the fault suite. It starts ``dercmd run``
as a user does (its own process, its own ``redis-server`` on a free port, the embedded
broker, a SQLite ledger in the work dir), offers commands over REST at ``--rate`` per second,
and, one phase each, while the load goes on:

- ``kill:<service>``: kill -9 one service (the launcher starts it again);
- ``restart:redis``: kill -9 the Redis server (it comes back empty: no persistence);
- ``restart:kafka``: kill -9 the broker (the embedded one comes back empty);
- ``cut:backend``: freeze the simulated backends (SIGSTOP, then SIGCONT after ``--cut-seconds``):
  calls in flight and calls made meanwhile hang, are given up by dispatch, and are then acted
  on by the devices when the backend thaws, the worst case of a network cut.

Then it waits until every accepted command is terminal (``--drain`` s at most) and prints,
per phase, from the ledger and the simulator's record of what each device received:

- **lost**: accepted (HTTP 201) but not in the ledger;
- **twice**: delivered to a device more than once;
- **stuck**: in the ledger, but not terminal by the end of the drain;
- **untruthful**: ``Succeeded`` though no device got it, or ``Failed``/``Canceled`` though
  one did.

Every one must be 0; the exit code is 1 otherwise. A request refused while a service was
down (a 503, a refused connection) was never accepted: it is counted, not lost. Requests
produced onto Kafka are not part of the suite: with the embedded broker, which keeps nothing,
what it acknowledged and nobody read is lost with it (docs/operations.md, "Crashes and restarts").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dercmd.events import CommandStatus
from dercmd.launcher import SERVICES, Stack, free_port, isolated_env
from dercmd.ledger import Ledger

from . import fleetgen, procstat
from .load import Offered, RestLoad, receipts
from .report import grid, untruthful

DEFAULT_FAULTS = (
    *(f"kill:{s}" for s in SERVICES if s != "simulator"),
    "restart:redis",
    "restart:kafka",
    "cut:backend",
)
#: Settings of the suite's stack: no cooldown (the load commands the same entities again),
#: and the ledger's deadlines short enough for a run of minutes (defaults: docs/operations.md).
STACK_SETTINGS = {
    "cooldown_s": "0",
    "sim_report_interval_s": "0",
    "sweep_interval_s": "1",
    "recover_after_s": "5",
    "deadline_sent_s": "15",
}
TERMINAL = {s.value for s in CommandStatus if s.terminal}


class Launched:
    """``dercmd run`` in its own process, as a user starts it, and its children by name."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.stack = Stack(env=env)  # only for the settings and service URLs it derives
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 120) -> None:
        with open(self.log, "ab") as out:
            # SIGINT ignored, as a shell starts a job in the background: Ctrl-C must stop it still.
            self.proc = subprocess.Popen([sys.executable, "-m", "dercmd.launcher", "run"], env={**os.environ, **self.env},
                                         stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        end = time.monotonic() + deadline_s
        while b"dercmd is running" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"dercmd run did not start (see {self.log})")
            time.sleep(0.2)

    def children(self) -> dict[str, int]:
        """The launcher's child processes: service name (or kafka, redis) -> pid."""
        assert self.proc is not None
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            if procstat.parent(int(entry.name)) != self.proc.pid:
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in argv and argv[argv.index(b"-m") + 1].startswith(b"dercmd."):
                found[argv[argv.index(b"-m") + 1].decode().removeprefix("dercmd.")] = int(entry.name)
            elif b"redis-server" in argv[0]:
                found["redis"] = int(entry.name)
            elif b"broker" in argv:
                found["kafka"] = int(entry.name)
        return found

    def healthy(self) -> bool:
        for name in self.stack.services:
            try:
                if httpx.get(f"{self.stack.url(name)}/health", timeout=2).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        return True

    def kill(self, name: str, deadline_s: float = 90) -> float:
        """kill -9 one child, then wait until the launcher has started it again and every
        service is healthy; the seconds that took."""
        before = self.children()[name]
        os.kill(before, signal.SIGKILL)
        started = time.monotonic()
        while not (self.children().get(name, before) != before and self.healthy()):
            if time.monotonic() - started > deadline_s:
                raise RuntimeError(f"{name} not back within {deadline_s:.0f} s (see {self.log})")
            time.sleep(0.2)
        return time.monotonic() - started

    def stop(self, deadline_s: float = 60) -> int:
        """SIGINT, as Ctrl-C; the launcher's exit code."""
        assert self.proc is not None
        children = self.children()
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"dercmd run did not stop within {deadline_s:.0f} s of SIGINT") from None
        if left := [name for name, pid in children.items() if procstat.alive(pid)]:
            raise RuntimeError(f"dercmd run exited and left {', '.join(left)} running")
        return code


@dataclass
class Phase:
    fault: str
    offered: Offered | None = None
    recovered_s: float = 0.0
    recovered_at: float = 0.0  # wall clock, when the fault was over
    counts: dict[str, Any] = field(default_factory=dict)


async def _inject(launched: Launched, fault: str, cut_s: float) -> float:
    kind, _, what = fault.partition(":")
    if kind in ("kill", "restart"):
        return await asyncio.to_thread(launched.kill, what)
    if kind == "cut":
        pid = launched.children()["simulator"]
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(cut_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return cut_s
    raise ValueError(f"unknown fault {fault!r}: kill:<service>, restart:redis, restart:kafka or cut:backend")


async def _run_phases(launched: Launched, args: argparse.Namespace, ids: Sequence[str]) -> list[Phase]:
    phases = [Phase(f) for f in args.faults]
    per_phase = int(args.rate * args.phase_seconds)
    async with RestLoad(launched.stack.url("intake"), args.concurrency) as load:
        for i, phase in enumerate(phases):
            entities = [ids[(i * per_phase + k) % len(ids)] for k in range(per_phase)]
            print(f"faults: {phase.fault} under {args.rate:g} commands/s ...", flush=True)
            offering = asyncio.create_task(load.paced(entities, args.rate, 0.01))
            await asyncio.sleep(args.phase_seconds / 3)
            phase.recovered_s = await _inject(launched, phase.fault, args.cut_seconds)
            phase.recovered_at = time.time()
            phase.offered = await offering
            print(f"faults: {phase.fault}: back after {phase.recovered_s:.1f} s; {len(phase.offered.produced_at):,} accepted, "
                  f"{sum(phase.offered.post_errors.values()):,} refused", flush=True)
    return phases


def _drain(ledger: Ledger, accepted: set[str], deadline_s: float) -> dict[str, Any]:
    """Every accepted command's ledger state, once all are terminal or the deadline passed."""
    end = time.monotonic() + deadline_s
    while True:
        states = ledger.get_many(accepted)
        open_ = [c for c, s in states.items() if s.status.value not in TERMINAL]
        if not open_ and len(states) == len(accepted) or time.monotonic() > end:
            return states
        time.sleep(1)


def _count(phase: Phase, states: dict[str, Any], received: dict[str, list[float]]) -> None:
    assert phase.offered is not None
    ids = set(phase.offered.produced_at)
    mine = {c: states[c] for c in ids if c in states}
    terminal = {c: s.status.value for c, s in mine.items() if s.status.value in TERMINAL}
    wrong = untruthful(terminal, {c: t for c, t in received.items() if c in ids})
    # How long after the fault was over the last command accepted before then ended: the
    # time recovery took (0 when they had all ended before).
    before = [s for c, s in mine.items() if c in terminal and phase.offered.produced_at[c] <= phase.recovered_at]
    last = max((s.updated_at.timestamp() for s in before), default=phase.recovered_at)
    phase.counts = {
        "settled_s": max(0.0, last - phase.recovered_at),
        "accepted": len(ids),
        "refused": sum(phase.offered.post_errors.values()),
        "lost": len(ids - set(mine)),
        "twice": sum(1 for c in ids if len(received.get(c, ())) > 1),
        "stuck": len(mine) - len(terminal),
        "untruthful": sum(wrong.values()),
        "statuses": Counter(f"{s.status.value}{': ' + s.reason if s.reason else ''}" for s in mine.values()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dercmd.bench.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=20_000, help="fleet size, vendor cloud (default 20,000)")
    p.add_argument("--rate", type=float, default=300, help="commands/s offered over REST (default 300)")
    p.add_argument("--concurrency", type=int, default=64, help="POSTs in flight at most (default 64)")
    p.add_argument("--phase-seconds", type=float, default=30, help="load per fault; the fault comes a third in (default 30)")
    p.add_argument("--cut-seconds", type=float, default=10, help="cut:backend: how long the backend is frozen (default 10)")
    p.add_argument("--faults", type=lambda t: [f for f in t.split(",") if f], default=list(DEFAULT_FAULTS),
                   help=f"comma-separated, in order (default: {','.join(DEFAULT_FAULTS)})")
    p.add_argument("--drain", type=float, default=180, help="seconds for every accepted command to end (default 180)")
    p.add_argument("--confirm-ms", type=int, default=None,
                   help="how long a simulated device takes to confirm a command, ms (default: the stack's, 5)")
    p.add_argument("--work-dir", type=Path, default=None, help="fleet, ledger and logs (default: a new temp dir)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[Phase]:
    """The whole suite; the phases with their counts."""
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dercmd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"faults: work dir {work} (fleet, ledger, launcher.log)", flush=True)
    ids = fleetgen.write(work / "fleet.yaml", args.entities)
    database_url = f"sqlite:///{work}/ledger.sqlite3"
    settings = STACK_SETTINGS | ({"sim_confirm_delay_ms": str(args.confirm_ms)} if args.confirm_ms is not None else {})
    env = isolated_env(redis_url=f"redis://127.0.0.1:{free_port()}/0", database_url=database_url,
                       fleet_file=work / "fleet.yaml", **settings)
    launched = Launched(env, work / "launcher.log")
    ledger = Ledger(database_url)
    launched.start()
    try:
        phases = asyncio.run(_run_phases(launched, args, ids))
        accepted = {c for p in phases if p.offered for c in p.offered.produced_at}
        print(f"faults: waiting up to {args.drain:.0f} s for {len(accepted):,} accepted commands to end ...", flush=True)
        states = _drain(ledger, accepted, args.drain)
        received = asyncio.run(receipts(launched.stack.url("simulator")))
        for phase in phases:
            _count(phase, states, received)
    finally:
        code = launched.stop()
        ledger.close()
    if code != 0:
        raise RuntimeError(f"dercmd run exited with {code} on SIGINT")
    return phases


def report(phases: Sequence[Phase]) -> str:
    header = ("fault", "back after", "all ended after it", "accepted", "refused", "lost", "twice", "stuck", "untruthful",
              "statuses")
    rows = [(p.fault, f"{p.recovered_s:.1f} s", f"{p.counts['settled_s']:.1f} s", f"{p.counts['accepted']:,}",
             f"{p.counts['refused']:,}",
             *(p.counts[k] for k in ("lost", "twice", "stuck", "untruthful")),
             ", ".join(f"{k} {v:,}" for k, v in p.counts["statuses"].most_common())) for p in phases]
    return grid(header, rows)


def failures(phases: Sequence[Phase]) -> int:
    return sum(p.counts[k] for p in phases for k in ("lost", "twice", "stuck", "untruthful"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = run(args)
    print("\n" + report(phases))
    bad = failures(phases)
    print(f"\n{'every fault: 0 lost, 0 twice, 0 stuck, 0 untruthful' if not bad else f'{bad} failures'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
