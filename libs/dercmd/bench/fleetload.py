"""How long a fleet file of N entities takes to load, and the memory it takes, each in a
fresh process as a service loads it at start-up (issue 5: 10^5 entities in under 5 s and
under 100 MB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import fleetgen

#: Run in a new interpreter: what ``Fleet.load`` costs beyond what importing it costs.
_MEASURE = """
import json, sys, time
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
from dercmd.fleet import Fleet
before = kib("VmRSS")
started = time.perf_counter()
fleet = Fleet.load(sys.argv[1])
print(json.dumps({"entities": len(fleet.entities), "seconds": time.perf_counter() - started,
                  "kept_mb": (kib("VmRSS") - before) / 1024, "peak_mb": (kib("VmHWM") - before) / 1024}))
"""


def measure(work: Path, n: int) -> dict[str, Any]:
    """Write a fleet of ``n`` entities (with a tenth of them inverters) and load it (Linux:
    the memory figures come from ``/proc``). ``peak_mb``: the highest resident memory while
    loading, above the process's before."""
    path = work / f"fleet-{n}.yaml"
    fleetgen.write(path, n - n // 10, pv=n // 10)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout), file_mb=path.stat().st_size / 1e6)
