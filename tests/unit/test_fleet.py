from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dercmd.events import CommandType as T
from dercmd.fleet import Fleet, Role, _built_from_events, _detached, _NeedsComposer

EXAMPLE = Path(__file__).parents[2] / "deploy" / "fleet.example.yaml"
CHARGING = {T.START_CHARGING, T.STOP_CHARGING}
PV_ALL = {T.RESET, T.DISCONNECT, T.LIMIT_FEED_IN, T.STOP_FEED_IN, T.LIMIT_PRODUCTION_POWER}


def fleet(**entities: dict) -> Fleet:
    return Fleet.model_validate({"entities": entities})


def supported(f: Fleet, entity_id: str) -> set[T]:
    entity = f.entity(entity_id)
    assert entity is not None
    return {t for t in T if f.supports(entity, t)}


def test_the_example_fleet_loads_and_has_the_documented_entities() -> None:
    f = Fleet.load(EXAMPLE)
    for entity_id in ("ev-1", "cp-1", "pv-1", "pv-2", "dev-1"):
        assert f.entity(entity_id) is not None
    assert f.entity("pv-1").vendor == "huawei"  # type: ignore[union-attr]
    assert len(f.entity("dev-1").assets) == 2  # type: ignore[union-attr]


def test_huawei_inverters_cannot_be_disconnected() -> None:
    f = fleet(h={"kind": "PV", "vendor": "huawei", "backend": "vendor-cloud"}, s={"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"})
    assert supported(f, "h") == PV_ALL - {T.DISCONNECT}
    assert supported(f, "s") == PV_ALL


def test_bmw_charges_only_through_an_aggregator() -> None:
    f = fleet(
        direct={"kind": "EV", "vendor": "bmw", "backend": "vendor-cloud"},
        agg={"kind": "EV", "vendor": "bmw", "backend": "ev-aggregator"},
        other={"kind": "EV", "vendor": "tesla", "backend": "vendor-cloud"},
    )
    assert supported(f, "direct") == set()
    assert supported(f, "agg") == CHARGING
    assert supported(f, "other") == CHARGING


def test_ocpp_charge_points_support_what_they_declared_within_their_kind() -> None:
    f = fleet(
        yes={"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": ["StartCharging", "StopCharging"]},
        no={"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": []},
        odd={"kind": "CP", "vendor": "alfen", "backend": "ocpp", "declaredTypes": ["StartCharging", "Disconnect"]},
    )
    assert supported(f, "yes") == CHARGING
    assert supported(f, "no") == set()
    assert supported(f, "odd") == {T.START_CHARGING}


def test_an_ambiguous_compatibility_table_is_refused_at_load() -> None:
    with pytest.raises(ValidationError, match="equally specific"):
        Fleet.model_validate(
            {
                "entities": {"x": {"kind": "PV", "vendor": "a", "backend": "b"}},
                "compatibility": {"rows": [
                    {"kind": "PV", "vendor": "a", "backend": "*", "types": ["Reset"]},
                    {"kind": "PV", "vendor": "*", "backend": "b", "types": []},
                ]},
            }
        )


def test_roles_come_from_globbed_grants_and_the_strongest_wins() -> None:
    f = Fleet.model_validate(
        {
            "entities": {"ev-1": {"kind": "EV", "vendor": "t", "backend": "b"}, "pv-1": {"kind": "PV", "vendor": "t", "backend": "b"}},
            "tokens": {"t": [{"entities": "*", "role": "Viewer"}, {"entities": "ev-*", "role": "Contributor"}]},
        }
    )
    assert f.role("t", "ev-1") is Role.CONTRIBUTOR
    assert f.role("t", "pv-1") is Role.VIEWER
    assert f.role("nobody", "ev-1") is None
    assert Role.VIEWER.allows(Role.VIEWER) and not Role.VIEWER.allows(Role.CONTRIBUTOR)


def test_cooldown_overrides_most_specific_first() -> None:
    f = Fleet.model_validate(
        {
            "entities": {
                "a": {"kind": "PV", "vendor": "sma", "backend": "b"},
                "b": {"kind": "PV", "vendor": "huawei", "backend": "b"},
                "c": {"kind": "PV", "vendor": "sma", "backend": "b", "cooldownS": 0},
                "d": {"kind": "EV", "vendor": "t", "backend": "b"},
            },
            "cooldowns": {"PV": 60, "PV/huawei": 300},
        }
    )
    assert [f.cooldown_s(f.entity(e), 600) for e in "abcd"] == [60, 300, 0, 600]  # type: ignore[arg-type]


def write_large_fleet(path: Path, n: int) -> None:
    """A fleet file of ``n`` entities in the example's format: kinds in turn, several vendors,
    mostly vendor-cloud, every tenth charge point on OCPP with what it declared, some BMWs
    through an aggregator, some inverters with assets and some with a vendor device id."""
    vendors = {"EV": ["tesla", "volkswagen", "bmw", "renault"], "CP": ["alfen", "wallbox", "abb"],
               "PV": ["huawei", "sma", "enphase", "fronius"]}
    lines = ["entities:"]
    for i in range(n):
        kind = ("EV", "CP", "PV")[i % 3]
        vendor = vendors[kind][(i // 3) % len(vendors[kind])]
        backend, extra = "vendor-cloud", ""
        if kind == "CP" and i % 10 == 1:
            backend = "ocpp"
            extra = ", declaredTypes: [StartCharging, StopCharging]" if i % 20 == 1 else ", declaredTypes: [StartCharging, Reset]"
        elif kind == "EV" and vendor == "bmw" and (i // 12) % 2:
            backend = "ev-aggregator"
        if kind == "PV" and i % 50 == 2:
            extra += ", assets: [inverter-a, inverter-b]"
        if i % 7 == 0:
            extra += f", vendorDeviceId: vd-{i}"
        lines.append(f"  {kind.lower()}-{i}: {{kind: {kind}, vendor: {vendor}, backend: {backend}{extra}}}")
    lines += ["cooldowns: {PV: 60, PV/huawei: 300}", "tokens:", "  t:", "    - {entities: 'ev-*', role: Contributor}"]
    path.write_text("\n".join(lines) + "\n")


def test_a_fleet_of_100_000_entities_loads(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    write_large_fleet(path, 100_000)
    f = Fleet.load(path)
    assert len(f.entities) == 100_000
    # (i // 3) % 4 picks the vendor: ev-6 is a bmw on vendor-cloud, ev-18 one through the aggregator
    assert (f.entity("ev-6").vendor, f.entity("ev-6").backend) == ("bmw", "vendor-cloud")  # type: ignore[union-attr]
    assert (f.entity("ev-18").vendor, f.entity("ev-18").backend) == ("bmw", "ev-aggregator")  # type: ignore[union-attr]
    assert supported(f, "ev-6") == set() and supported(f, "ev-18") == CHARGING and supported(f, "ev-0") == CHARGING
    assert supported(f, "ev-99999") == CHARGING  # i=99999: (33333 % 4) -> volkswagen
    assert supported(f, "cp-1") == CHARGING  # ocpp, declared both
    assert supported(f, "cp-31") == {T.START_CHARGING}  # ocpp, declared Reset too: not a CP type
    assert supported(f, "cp-4") == CHARGING  # vendor-cloud
    assert supported(f, "pv-2") == PV_ALL - {T.DISCONNECT}  # huawei
    assert supported(f, "pv-5") == PV_ALL  # sma
    assert f.entity("pv-2").assets == ("inverter-a", "inverter-b")  # type: ignore[union-attr]
    assert f.entity("ev-0").device_id == "vd-0" and f.entity("ev-3").device_id == "ev-3"  # type: ignore[union-attr]
    assert f.cooldown_s(f.entity("pv-2"), 600) == 300 and f.cooldown_s(f.entity("pv-5"), 600) == 60  # type: ignore[arg-type]
    assert f.role("t", "ev-42") is Role.CONTRIBUTOR and f.role("t", "pv-2") is None


@pytest.mark.parametrize("text", [
    "a: 1\nb: [1, 2.5, true, null, ~, '3', 2026-01-01, 0x10, .inf, !!str 12]\nc: {d: e, 'f g': \"h\\u00e9\"}\n",
    "- &a {k: v}\n- *a\n",
    "a: 1\na: 2\n",
    "",
    # what the event builder leaves to PyYAML's composer: the same document still comes out
    "base: &b {x: 1}\nd:\n  <<: *b\n  y: 2\n",
    "s: !!set {a, b}\n",
])
def test_the_fleet_file_parser_builds_what_yaml_safe_load_builds(text: str) -> None:
    try:
        built = _built_from_events(text)
    except _NeedsComposer:
        built = _detached(yaml.safe_load(text), {})
    assert built == yaml.safe_load(text)


@pytest.mark.parametrize("text", ["? [1, 2]\n: v\n", "---\na: 1\n---\nb: 2\n", "a: !custom 1\n"])
def test_a_fleet_file_yaml_cannot_build_is_refused_as_yaml_refuses_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(yaml.YAMLError):
        Fleet.load(path)
