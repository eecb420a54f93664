"""DERCMD_ENVIRONMENT=production refuses the secrets and tokens the docs publish (docs/operations.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dercmd.protocols.ev_aggregator import EvAggregatorSettings
from dercmd.protocols.ocpp import OcppSettings
from dercmd.settings import Settings, documented_defaults, load, weak_secrets

#: A secret as production wants it (32 random bytes, hex).
STRONG = "6f1c7d5e8f0b4a359a7e2f9f0e3c1b1184d2a7c35be94f0f9d61c2aa0e7b3c58"


def test_production_refuses_the_default_callback_secret_and_the_example_fleet() -> None:
    with pytest.raises(ValidationError, match="DERCMD_CALLBACK_SECRET.*example fleet"):
        Settings(environment="production")
    assert Settings(environment="production", callback_secret=STRONG, fleet_file="fleet.yaml").environment == "production"
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
    production = Settings(environment="production", callback_secret=STRONG, fleet_file="fleet.yaml")
    with pytest.raises(SystemExit, match="DERCMD_OCPP_GATEWAY_TOKEN.*bearer token 'dev-viewer'"):
        refuse_published(production, OcppSettings(), tokens=["dev-viewer"])
    refuse_published(Settings(), OcppSettings(), tokens=["dev-viewer"])  # development: anything goes


@pytest.mark.parametrize("secret", ["", "x", "s3cret", "a" * 64, "passwordpasswordpasswordpassword"])
def test_production_refuses_a_short_or_guessable_secret_with_one_line(secret: str) -> None:
    assert weak_secrets(Settings(callback_secret=secret)) == ["DERCMD_CALLBACK_SECRET"]
    with pytest.raises(ValidationError, match="shorter than 32 bytes or not random enough: DERCMD_CALLBACK_SECRET"):
        Settings(environment="production", callback_secret=secret, fleet_file="fleet.yaml")


def test_a_backends_weak_secret_refuses_the_service_that_would_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from dercmd.settings import refuse_published

    production = Settings(environment="production", callback_secret=STRONG, fleet_file="fleet.yaml")
    monkeypatch.setenv("DERCMD_OCPP_GATEWAY_TOKEN", "x")
    with pytest.raises(SystemExit, match="^dercmd: refusing to start: .*not random enough: DERCMD_OCPP_GATEWAY_TOKEN"):
        refuse_published(production, OcppSettings())
    monkeypatch.setenv("DERCMD_OCPP_GATEWAY_TOKEN", STRONG)
    refuse_published(production, OcppSettings())


def test_a_secret_can_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "callback-secret"
    secret.write_text(STRONG + "\n")  # as `echo` and most secret stores write it
    monkeypatch.setenv("DERCMD_CALLBACK_SECRET_FILE", str(secret))
    assert Settings().callback_secret == STRONG
    (tmp_path / "token").write_text("gateway-token")
    monkeypatch.setenv("DERCMD_OCPP_GATEWAY_TOKEN_FILE", str(tmp_path / "token"))
    assert OcppSettings().gateway_token == "gateway-token"
    monkeypatch.setenv("DERCMD_CALLBACK_SECRET", "another")
    with pytest.raises(ValueError, match="both DERCMD_CALLBACK_SECRET and DERCMD_CALLBACK_SECRET_FILE are set"):
        Settings()
    monkeypatch.delenv("DERCMD_CALLBACK_SECRET")
    monkeypatch.setenv("DERCMD_CALLBACK_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="DERCMD_CALLBACK_SECRET_FILE: cannot read"):
        Settings()
    with pytest.raises(SystemExit, match="^dercmd: refusing to start: DERCMD_CALLBACK_SECRET_FILE: cannot read"):
        load(Settings)


def test_dercmd_run_refuses_production_defaults_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERCMD_")} | {"DERCMD_ENVIRONMENT": "production"}
    done = subprocess.run([sys.executable, "-m", "dercmd.launcher", "run"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "dercmd: refusing to start: DERCMD_ENVIRONMENT=production, but these hold their documented defaults: "
        "DERCMD_CALLBACK_SECRET, DERCMD_FLEET_FILE (the example fleet); set your own"]


def test_production_refuses_charge_points_that_need_no_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dercmd.ocpp_gateway.app import build
    from dercmd.protocols.ocpp import hash_password
    from dercmd.settings import OcppGatewaySettings

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("entities:\n"
                     "  cp-open: {kind: CP, vendor: abb, backend: ocpp}\n"
                     f"  cp-locked: {{kind: CP, vendor: abb, backend: ocpp, ocppPasswordHash: '{hash_password('k' * 20)}'}}\n")
    monkeypatch.setenv("DERCMD_OCPP_GATEWAY_TOKEN", STRONG)
    settings = OcppGatewaySettings(environment="production", fleet_file=str(fleet), kafka_bootstrap="127.0.0.1:1")
    with pytest.raises(SystemExit, match=r"^dercmd: refusing to start: .*need no password .*: cp-open$"):
        build(settings)
