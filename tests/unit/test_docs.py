"""The README's tables stay true: every setting and every topic is documented."""

from pathlib import Path

from dercmd import topics
from dercmd.dispatch import backends
from dercmd.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [f"DERCMD_{name.upper()}" for name in Settings.model_fields if f"`DERCMD_{name.upper()}`" not in README]
    assert missing == []


def test_every_backend_setting_is_in_the_readme() -> None:
    names = [
        f"{registration.settings.model_config['env_prefix']}{name.upper()}"
        for registration in backends.registered().values()
        if registration.settings.model_config.get("env_prefix")  # a backend of dercmd's, not a test's
        for name in registration.settings.model_fields
    ]
    assert names and [n for n in names if f"`{n}`" not in README] == []


def test_every_topic_and_model_version_is_in_the_readme() -> None:
    for topic in topics.ALL:
        assert f"`{topic.name}`" in README
        assert f"`{topic.model.CE_TYPE}`" in README
