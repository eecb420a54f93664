"""A fleet of N entities for the benchmark, in the fleet-file format (``deploy/fleet.example.yaml``).

By default every entity is on backend ``vendor-cloud`` (served by the simulator) and supports
``StartCharging``: nine in ten are EVs (tesla, volkswagen, renault), one in ten a charge
point (wallbox). ``mix`` moves shares of the fleet to the other backends, each with entities
that suit it (:data:`MIXABLE`): their ids start with the backend's prefix, and the command the
benchmark sends each entity is :func:`command_type` (``StopFeedIn`` to an inverter). Besides,
``pv`` inverters (sma) for the window phase. One token, :data:`TOKEN`, may command every
entity (REST mode and the batch API).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKEN = "bench-contributor"
BACKEND = "vendor-cloud"
COMMAND_TYPE = "StartCharging"
_EV_VENDORS = ("tesla", "volkswagen", "renault")


#: Per backend other than the vendor cloud: the prefix of its entities' ids, and what they are.
MIXABLE: dict[str, tuple[str, dict[str, str]]] = {
    "native-window": ("nw", {"kind": "PV", "vendor": "gridbox"}),
    "sunspec-modbus": ("ss", {"kind": "PV", "vendor": "sma"}),
    "ocpp": ("oc", {"kind": "CP", "vendor": "alfen", "declaredTypes": "[StartCharging, StopCharging]"}),
    "ev-aggregator": ("ag", {"kind": "EV", "vendor": "bmw"}),
}
_PV_PREFIXES = ("pv", "nw", "ss")


def parse_mix(text: str) -> dict[str, int]:
    """``"ocpp=500,sunspec-modbus=200"`` -> entities per backend (the rest: vendor-cloud)."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("=")
        if name not in MIXABLE:
            raise ValueError(f"--mix: {name!r} is not one of {', '.join(MIXABLE)}")
        mix[name] = int(count)
    return mix


def entity_ids(n: int, mix: dict[str, int] | None = None) -> list[str]:
    width = max(6, len(str(n)))
    ids = [f"{MIXABLE[name][0]}-{i:0{width}d}" for name, count in (mix or {}).items() for i in range(count)]
    rest = n - len(ids)
    if rest < 0:
        raise ValueError(f"--mix asks for {len(ids)} entities of a fleet of {n}")
    return [f"{'cp' if i % 10 == 9 else 'ev'}-{i:0{width}d}" for i in range(rest)] + ids


def entity(entity_id: str, i: int) -> dict[str, str]:
    prefix = entity_id.split("-", 1)[0]
    for name, (mine, fields) in MIXABLE.items():
        if prefix == mine:
            return fields | {"backend": name}
    if prefix == "cp":
        return {"kind": "CP", "vendor": "wallbox", "backend": BACKEND}
    return {"kind": "EV", "vendor": _EV_VENDORS[i % len(_EV_VENDORS)], "backend": BACKEND}


def command_type(entity_id: str) -> str:
    """What the benchmark sends the entity: ``StartCharging``, or ``StopFeedIn`` to an inverter."""
    return "StopFeedIn" if entity_id.split("-", 1)[0] in _PV_PREFIXES else COMMAND_TYPE


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


def write(path: Path, n: int, pv: int = 0, mix: dict[str, int] | None = None) -> list[str]:
    """Write a fleet file of ``n`` entities (``mix`` of them on other backends) and ``pv``
    inverters (one flow mapping per line) and return the ids of the ``n``."""
    ids = entity_ids(n, mix)
    lines = [f"# dercmd bench fleet: {n} entities ({mix or 'all'} on other backends) and {pv} inverters on {BACKEND}", "entities:"]
    for i, eid in enumerate(ids):
        fields = ", ".join(f"{k}: {v}" for k, v in entity(eid, i).items())
        lines.append(f"  {eid}: {{{fields}}}")
    lines += [f"  {eid}: {{kind: PV, vendor: sma, backend: {BACKEND}}}" for eid in pv_ids(pv)]
    lines += ["cooldowns: {}", "tokens:", f"  {TOKEN}:", '    - {entities: "*", role: Contributor}', ""]
    path.write_text("\n".join(lines))
    return ids
