"""Each backend declares what it can carry when it registers, and dispatch refuses to start
while the compatibility table promises more: a type intake would accept that the backend does
not send, or a ``nativeWindows`` entry that disagrees with the backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dercmd.dispatch import backends
from dercmd.dispatch.backends.capabilities import Capabilities, mismatches, refuse_mismatched
from dercmd.events import CommandType
from dercmd.fleet import CompatibilityTable, EntityKind, Fleet
from dercmd.settings import Settings

SHIPPED: dict[str, Any] = yaml.safe_load((Path(__file__).parents[2] / "libs/dercmd/data/compatibility.yaml").read_text())


def _table(*rows: dict[str, Any], native: list[str] | None = None) -> CompatibilityTable:
    document = {"rows": [*SHIPPED["rows"], *rows], "nativeWindows": SHIPPED["nativeWindows"] if native is None else native}
    return CompatibilityTable.model_validate(document)


def _shipped() -> list[backends.Registration]:
    """dercmd's own backends (a test's, or one added later, would change the lists below)."""
    registered = backends.registered()
    return [registered[name] for name in ("ev-aggregator", "native-window", "ocpp", "sunspec-modbus", "vendor-cloud")]


def test_the_shipped_table_agrees_with_every_backend() -> None:
    registered = backends.registered()
    assert {"vendor-cloud", "native-window", "ev-aggregator", "ocpp", "sunspec-modbus"} <= set(registered)
    assert mismatches(CompatibilityTable.bundled(), registered.values()) == []
    refuse_mismatched(CompatibilityTable.bundled(), registered.values())  # does not stop


def test_every_backend_sends_what_it_declares() -> None:
    for registration in backends.registered().values():
        if registration.settings.model_config.get("env_prefix"):  # a backend of dercmd's, not a test's
            assert registration.capabilities.types, registration.name


def test_a_type_the_backend_does_not_send_is_refused_naming_the_row_the_backend_and_the_types() -> None:
    table = _table({"kind": "EV", "vendor": "*", "backend": "ev-aggregator", "types": ["StartCharging", "StopCharging", "Reset"]})
    with pytest.raises(SystemExit) as stopped:
        refuse_mismatched(table, backends.registered().values())
    assert str(stopped.value) == (
        "dercmd: refusing to start: compatibility row {kind: EV, vendor: *, backend: ev-aggregator, "
        "types: [StartCharging, StopCharging, Reset]} allows Reset on backend ev-aggregator, "
        "which sends only StartCharging, StopCharging"
    )


def test_a_wildcard_row_counts_for_every_backend_of_its_kind() -> None:
    """PV inverters on any backend may now LimitFeedIn and StartCharging: sunspec-modbus does
    not start charging; vendor-cloud and native-window send every type."""
    table = _table({"kind": "PV", "vendor": "sma", "backend": "*", "types": ["LimitFeedIn", "StartCharging"]})
    assert mismatches(table, _shipped()) == [
        "compatibility row {kind: PV, vendor: sma, backend: *, types: [LimitFeedIn, StartCharging]} allows StartCharging "
        "on backend sunspec-modbus, which sends only Disconnect, LimitFeedIn, LimitProductionPower, Reset, StopFeedIn"
    ]


def test_declared_types_are_bounded_by_the_kind_and_that_bound_is_checked() -> None:
    """A charge point over OCPP supports what it declared, at most what a charge point can do:
    a kind row that grows must be met by the OCPP backend."""
    table = CompatibilityTable.model_validate({
        "rows": [{"kind": "CP", "vendor": "*", "backend": "*", "types": ["StartCharging", "StopCharging", "Reset"]},
                 {"kind": "CP", "vendor": "*", "backend": "ocpp", "types": "declared"}],
    })
    ocpp = backends.registered()["ocpp"]
    assert mismatches(table, [ocpp]) == [
        "compatibility row {kind: CP, vendor: *, backend: ocpp, types: declared} allows Reset on backend ocpp, "
        "which sends only StartCharging, StopCharging"
    ]


def test_native_windows_must_list_exactly_the_backends_that_keep_windows() -> None:
    registered = _shipped()
    assert mismatches(_table(native=["native-window", "vendor-cloud"]), registered) == [
        "compatibility nativeWindows lists backend vendor-cloud, which does not declare native_windows"]
    assert mismatches(_table(native=[]), registered) == [
        "backend native-window declares native_windows, and compatibility nativeWindows does not list it"]
    assert mismatches(_table(native=["native-window", "a-backend-not-deployed-here"]), registered) == []


def test_only_the_kinds_a_backend_serves_are_checked() -> None:
    class Fake:
        name = "fake"
        capabilities = Capabilities(frozenset({CommandType.RESET}), kinds=frozenset({EntityKind.PV}))

    table = CompatibilityTable.model_validate({"rows": [
        {"kind": "EV", "vendor": "*", "backend": "*", "types": ["StartCharging"]},
        {"kind": "PV", "vendor": "*", "backend": "*", "types": ["Reset"]},
    ]})
    assert mismatches(table, [Fake()]) == []
    Fake.capabilities = Capabilities(frozenset({CommandType.RESET}))
    assert len(mismatches(table, [Fake()])) == 1


def test_dispatch_refuses_to_create_a_backend_while_the_fleet_table_disagrees() -> None:
    fleet = Fleet.model_validate({
        "entities": {"ev-1": {"kind": "EV", "vendor": "bmw", "backend": "ev-aggregator"}},
        "compatibility": {"rows": [{"kind": "EV", "vendor": "*", "backend": "*", "types": ["StartCharging", "LimitFeedIn"]}]},
    })
    context = backends.BackendContext(settings=Settings(), fleet=fleet, redis=None,  # type: ignore[arg-type]
                                      callback_base_url="http://127.0.0.1:1", token=lambda e, c: "", entity_of=lambda t, c: None,
                                      report=None)  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match=r"^dercmd: refusing to start: compatibility row .* allows LimitFeedIn on backend ev-aggregator"):
        backends.create("ev-aggregator", context)


def test_the_dispatch_process_stops_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({
        "entities": {"pv-1": {"kind": "PV", "vendor": "sma", "backend": "sunspec-modbus"}},
        "compatibility": {"rows": [{"kind": "PV", "vendor": "*", "backend": "*", "types": ["Reset", "StartCharging"]}]},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERCMD_")} | {
        "DERCMD_FLEET_FILE": str(fleet), "DERCMD_KAFKA_BOOTSTRAP": "127.0.0.1:1", "DERCMD_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "dercmd.dispatch"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "dercmd: refusing to start: compatibility row {kind: PV, vendor: *, backend: *, types: [Reset, StartCharging]} "
        "allows StartCharging on backend sunspec-modbus, which sends only Disconnect, LimitFeedIn, LimitProductionPower, Reset, StopFeedIn"
    )
