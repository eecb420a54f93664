from pathlib import Path

import pytest
from pydantic import ValidationError

from dercmd.events import CommandType as T
from dercmd.fleet import Fleet, Role

EXAMPLE = Path(__file__).parents[2] / "deploy" / "fleet.example.yaml"
CHARGING = {T.START_CHARGING, T.STOP_CHARGING}
PV_ALL = {T.RESET, T.DISCONNECT, T.LIMIT_FEED_IN, T.STOP_FEED_IN}


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
