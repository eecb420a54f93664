import pytest

from dercmd import launcher
from dercmd.launcher import LaunchError, Stack, free_port


def test_without_redis_or_its_binary_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    stack = Stack(env={"DERCMD_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    with pytest.raises(LaunchError, match="apt-get install redis-server"):
        stack._ensure_redis()
    assert stack.procs == {}


def test_services_see_the_stacks_environment_not_the_launchers() -> None:
    stack = Stack(env={"DERCMD_API_PORT": "18080", "DERCMD_COOLDOWN_S": "0"})
    assert stack.settings.api_port == 18080 and stack.settings.cooldown_s == 0
    assert stack.url("intake") == "http://127.0.0.1:18080"


def test_an_isolated_stack_holds_every_backend_at_the_local_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each protocol's settings name their "on this machine" fields: none is listed by hand."""
    monkeypatch.setenv("DERCMD_VENDOR_CLOUD_URL", "https://elsewhere.example")
    env = launcher.isolated_env(redis_url="redis://127.0.0.1:1/0", database_url="sqlite://", fleet_file="fleet.yaml")
    assert {k: v for k, v in env.items() if k.split("_")[1] in ("VENDOR", "NATIVE", "SUNSPEC", "OCPP", "EV")} == {
        "DERCMD_VENDOR_CLOUD_URL": "", "DERCMD_NATIVE_WINDOW_URL": "", "DERCMD_SUNSPEC_MODBUS_HOST": "",
        "DERCMD_SUNSPEC_MODBUS_PORT": "0", "DERCMD_OCPP_GATEWAY_URL": "", "DERCMD_EV_AGGREGATOR_URL": "",
        "DERCMD_OCPP_GATEWAY_PORT": env["DERCMD_OCPP_GATEWAY_PORT"],
    }
