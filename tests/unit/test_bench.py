"""The benchmark's pure parts: the generated fleet loads, pacing adds up, percentiles by rank.
(The bench measures; nothing here asserts on timing.)"""

from __future__ import annotations

from pathlib import Path

from dercmd.bench import fleetgen
from dercmd.bench.load import paced, request_record
from dercmd.bench.report import percentile
from dercmd.events import CommandRequestV1, CommandType
from dercmd.fleet import Fleet, Role


def test_generated_fleet_loads_and_every_entity_can_start_charging(tmp_path: Path) -> None:
    ids = fleetgen.write(tmp_path / "fleet.yaml", 50)
    fleet = Fleet.load(tmp_path / "fleet.yaml")
    assert list(fleet.entities) == ids
    assert {e.backend for e in fleet.entities.values()} == {"vendor-cloud"}
    assert sum(e.kind == "EV" for e in fleet.entities.values()) == 45
    assert all(fleet.supports(e, CommandType.START_CHARGING) for e in fleet.entities.values())
    assert fleet.role(fleetgen.TOKEN, ids[-1]) is Role.CONTRIBUTOR
    assert Fleet.model_validate(fleetgen.fleet(50)).entities == fleet.entities


def test_request_record_is_a_valid_request_keyed_by_entity() -> None:
    key, value, headers = request_record("c-1", "ev-000001")
    request = CommandRequestV1.model_validate_json(value)
    assert (key, request.id, request.entity_id) == (b"ev-000001", "c-1", "ev-000001")
    assert dict(headers)["ce_type"] == b"dercmd.command.request.v1"


def test_paced_sends_rate_times_step_each_step() -> None:
    steps = list(paced(1000, 1000, 0.01))
    assert len(steps) == 100 and {n for _, n in steps} == {10}
    assert steps[-1][0] == 0.99
    slow = list(paced(5, 100, 0.01))  # one per step
    assert [n for _, n in slow] == [1] * 5
    assert sum(n for _, n in paced(7, 3.3, 0.01)) == 7


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([], 50) is None


def test_a_mixed_fleet_puts_each_share_on_its_backend_and_each_entity_supports_what_it_is_sent(tmp_path: Path) -> None:
    mix = fleetgen.parse_mix("ocpp=5,sunspec-modbus=4,ev-aggregator=3,native-window=2")
    ids = fleetgen.write(tmp_path / "fleet.yaml", 50, mix=mix)
    fleet = Fleet.load(tmp_path / "fleet.yaml")
    backends = [fleet.entities[i].backend for i in ids]
    assert {name: backends.count(name) for name in mix} == mix and backends.count("vendor-cloud") == 36
    assert all(fleet.supports(fleet.entities[i], CommandType(fleetgen.command_type(i))) for i in ids)
