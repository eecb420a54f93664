"""DERCMD_ENVIRONMENT=production refuses the secrets and tokens the docs publish (docs/operations.md)."""

import pytest
from pydantic import ValidationError

from dercmd.protocols.ev_aggregator import EvAggregatorSettings
from dercmd.protocols.ocpp import OcppSettings
from dercmd.settings import Settings, documented_defaults


def test_production_refuses_the_default_callback_secret_and_the_example_fleet() -> None:
    with pytest.raises(ValidationError, match="DERCMD_CALLBACK_SECRET.*example fleet"):
        Settings(environment="production")
    assert Settings(environment="production", callback_secret="s3cret", fleet_file="fleet.yaml").environment == "production"
    assert Settings().environment == "development"  # make run and the tests keep their defaults


def test_the_backends_published_secrets_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert documented_defaults(OcppSettings()) == ["DERCMD_OCPP_GATEWAY_TOKEN"]
    assert set(documented_defaults(EvAggregatorSettings())) == {"DERCMD_EV_AGGREGATOR_CLIENT_SECRET",
                                                                "DERCMD_EV_AGGREGATOR_WEBHOOK_SECRET"}
    monkeypatch.setenv("DERCMD_OCPP_GATEWAY_TOKEN", "mine")
    assert documented_defaults(OcppSettings()) == []


def test_a_service_refuses_to_start_with_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from dercmd.settings import get_settings, refuse_published

    monkeypatch.setenv("DERCMD_ENVIRONMENT", "production")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match=r"^dercmd: refusing to start: .*DERCMD_CALLBACK_SECRET"):
            get_settings()
    finally:
        get_settings.cache_clear()
    monkeypatch.delenv("DERCMD_ENVIRONMENT")
    production = Settings(environment="production", callback_secret="s3cret", fleet_file="fleet.yaml")
    with pytest.raises(SystemExit, match="DERCMD_OCPP_GATEWAY_TOKEN.*bearer token 'dev-viewer'"):
        refuse_published(production, OcppSettings(), tokens=["dev-viewer"])
    refuse_published(Settings(), OcppSettings(), tokens=["dev-viewer"])  # development: anything goes
