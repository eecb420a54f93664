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
