"""``make faults``, short: ``dercmd run`` as a user starts it (in the background, SIGINT
ignored), under load, each service killed -9 in turn, Redis and the broker restarted empty,
the backend frozen; then nothing is lost, delivered twice, stuck or reported untruthfully, and
SIGINT stops every process. And children die with the launcher."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dercmd.bench import faults, procstat
from dercmd.launcher import free_port, isolated_env

from ..conftest import wait_for
from .conftest import FLEET

pytestmark = pytest.mark.e2e


def test_every_fault_loses_nothing_delivers_nothing_twice_and_leaves_nothing_stuck(tmp_path: Path) -> None:
    args = faults.parse_args(["--entities", "3000", "--rate", "60", "--phase-seconds", "6", "--cut-seconds", "4",
                              "--drain", "120", "--work-dir", str(tmp_path)])
    phases = faults.run(args)
    print("\n" + faults.report(phases))
    assert [p.fault for p in phases] == list(faults.DEFAULT_FAULTS)
    for phase in phases:
        assert phase.counts["accepted"] > 0, phase.fault
        assert {k: phase.counts[k] for k in ("lost", "twice", "stuck", "untruthful")} == dict.fromkeys(
            ("lost", "twice", "stuck", "untruthful"), 0), (phase.fault, phase.counts)
    # Only intake's own restart may refuse requests (503 or no answer), never the other faults.
    assert all(p.counts["refused"] == 0 for p in phases if p.fault not in ("kill:intake", "restart:kafka")), faults.report(phases)


def test_when_the_launcher_is_killed_every_process_it_started_dies_with_it(tmp_path: Path) -> None:
    env = isolated_env(redis_url=f"redis://127.0.0.1:{free_port()}/0", database_url=f"sqlite:///{tmp_path}/ledger.sqlite3",
                       fleet_file=FLEET)
    launched = faults.Launched(env, tmp_path / "launcher.log")
    launched.start()
    children = launched.children()
    assert set(children) >= {"kafka", "redis", *launched.stack.services}
    assert launched.proc is not None
    os.kill(launched.proc.pid, signal.SIGKILL)
    launched.proc.wait()
    wait_for(lambda: not [n for n, pid in children.items() if procstat.alive(pid)], deadline_s=30,
             what=f"{', '.join(children)} to die with the launcher")
