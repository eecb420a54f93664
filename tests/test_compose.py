"""docker-compose.yml and deploy/prometheus.yml stay valid and complete."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DERCMD_SERVICES = ["intake", "arbitration", "dispatch", "status", "ocpp_gateway", "simulator"]
ALL_SERVICES = ["kafka", "redis", "postgres", "prometheus", "grafana", *DERCMD_SERVICES]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_config_is_valid() -> None:
    proc = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_service_exists_with_a_healthcheck() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ALL_SERVICES:
        assert name in services, name
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_prometheus_scrapes_every_dercmd_service() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert set(DERCMD_SERVICES) <= jobs


def test_compose_sets_only_settings_that_exist() -> None:
    from dercmd.dispatch import backends
    from dercmd.settings import Settings

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    known = {f"DERCMD_{name.upper()}" for name in Settings.model_fields} | {
        f"{r.settings.model_config.get('env_prefix', '')}{name.upper()}"
        for r in backends.registered().values() for name in r.settings.model_fields
    }
    for name in DERCMD_SERVICES:
        env = services[name]["environment"]
        unknown = {key for key in env if key.startswith("DERCMD_")} - known
        assert not unknown, (name, unknown)
        assert services[name]["command"] == ["python", "-m", f"dercmd.{name}"]
