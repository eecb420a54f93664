"""A fleet of N entities for the benchmark, in the fleet-file format (``deploy/fleet.example.yaml``).

Every entity is on backend ``vendor-cloud`` (served by the simulator) and supports
``StartCharging``: nine in ten are EVs (tesla, volkswagen, renault), one in ten a charge
point (wallbox). Besides, ``pv`` inverters (sma) for the window phase. One token,
:data:`TOKEN`, may command every entity (REST mode and the batch API).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKEN = "bench-contributor"
BACKEND = "vendor-cloud"
COMMAND_TYPE = "StartCharging"
_EV_VENDORS = ("tesla", "volkswagen", "renault")


def entity_ids(n: int) -> list[str]:
    width = max(6, len(str(n)))
    return [f"{'cp' if i % 10 == 9 else 'ev'}-{i:0{width}d}" for i in range(n)]


def entity(entity_id: str, i: int) -> dict[str, str]:
    if entity_id.startswith("cp-"):
        return {"kind": "CP", "vendor": "wallbox", "backend": BACKEND}
    return {"kind": "EV", "vendor": _EV_VENDORS[i % len(_EV_VENDORS)], "backend": BACKEND}


def pv_ids(n: int) -> list[str]:
    width = max(6, len(str(n)))
    return [f"pv-{i:0{width}d}" for i in range(n)]


def fleet(n: int) -> dict[str, Any]:
    """The fleet as the data a fleet file holds (``Fleet.model_validate`` takes it)."""
    return {
        "entities": {eid: entity(eid, i) for i, eid in enumerate(entity_ids(n))},
        "cooldowns": {},
        "tokens": {TOKEN: [{"entities": "*", "role": "Contributor"}]},
    }


def write(path: Path, n: int, pv: int = 0) -> list[str]:
    """Write a fleet file of ``n`` entities and ``pv`` inverters (one flow mapping per line)
    and return the ids of the ``n``."""
    ids = entity_ids(n)
    lines = [f"# dercmd bench fleet: {n} entities and {pv} inverters on {BACKEND}", "entities:"]
    for i, eid in enumerate(ids):
        fields = ", ".join(f"{k}: {v}" for k, v in entity(eid, i).items())
        lines.append(f"  {eid}: {{{fields}}}")
    lines += [f"  {eid}: {{kind: PV, vendor: sma, backend: {BACKEND}}}" for eid in pv_ids(pv)]
    lines += ["cooldowns: {}", "tokens:", f"  {TOKEN}:", '    - {entities: "*", role: Contributor}', ""]
    path.write_text("\n".join(lines))
    return ids
