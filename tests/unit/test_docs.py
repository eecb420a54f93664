"""The docs stay true: every setting and every topic is documented, and every link leads somewhere.

The README is the front door (the topics table); docs/operations.md holds the settings tables.
"""

import re
from pathlib import Path

from dercmd import topics
from dercmd.dispatch import backends
from dercmd.settings import Settings

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_setting_is_in_the_operations_page() -> None:
    missing = [f"DERCMD_{name.upper()}" for name in Settings.model_fields if f"`DERCMD_{name.upper()}`" not in OPERATIONS]
    assert missing == []


def test_every_backend_setting_is_listed_by_dercmd_settings_with_what_it_does() -> None:
    """A backend's settings are documented where they are declared: ``dercmd settings`` lists
    them (docs/operations.md says so), so a new backend needs no docs edit to be documented."""
    from dercmd.cli.settings import every_setting

    listed = {name: text for name, _, text in every_setting()}
    names = [
        f"{registration.settings.model_config['env_prefix']}{name}".upper()
        for registration in backends.registered().values()
        if registration.settings.model_config.get("env_prefix")  # a backend of dercmd's, not a test's
        for name in registration.settings.model_fields
    ]
    assert names and [n for n in names if not listed.get(n)] == []
    assert "`dercmd settings`" in OPERATIONS


def test_every_topic_and_model_version_is_in_the_readme() -> None:
    for topic in topics.ALL:
        assert f"`{topic.name}`" in README
        assert f"`{topic.model.CE_TYPE}`" in README


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _relative_links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text())
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_anchor_of_a_heading_is_githubs() -> None:
    assert _anchor(" Time: schedules, windows, cancels and deadlines") == "time-schedules-windows-cancels-and-deadlines"
    assert _anchor("Why aiokafka `getmany`, not faust") == "why-aiokafka-getmany-not-faust"


def test_every_relative_link_points_to_an_existing_file_and_heading() -> None:
    assert len(PAGES) > 1
    broken = []
    for page in PAGES:
        for target in _relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def _documented_default(text: str) -> str:
    return "" if text == "(empty)" else text.strip("`")


def test_every_documented_default_is_the_code_s() -> None:
    rows = dict(re.findall(r"^\| `(DERCMD_[A-Z0-9_]+)` \| ([^|]*?) \|", OPERATIONS, re.M))
    fields = {f"DERCMD_{name.upper()}": field.default for name, field in Settings.model_fields.items()}
    for registration in backends.registered().values():
        prefix = registration.settings.model_config.get("env_prefix")
        if prefix:  # a backend of dercmd's, not a test's
            fields |= {f"{prefix}{name.upper()}": field.default for name, field in registration.settings.model_fields.items()}
    wrong = {}
    for name, default in fields.items():
        if name not in rows and name.removeprefix("DERCMD_").lower() not in Settings.model_fields:
            continue  # a backend's own setting not on the page: `dercmd settings` lists it
        documented = _documented_default(rows[name])
        if isinstance(default, bool):
            same = documented == str(default).lower()
        elif isinstance(default, int | float):
            same = float(documented) == default
        else:
            same = documented == str(default)
        if not same:
            wrong[name] = (documented, default)
    assert wrong == {}


def test_every_metric_is_on_the_operations_page() -> None:
    import importlib

    from prometheus_client import REGISTRY

    for module in ("consumer", "service", "intake.metrics", "arbitration.metrics", "dispatch.metrics",
                   "status.metrics", "ocpp_gateway.metrics", "simulator.metrics"):
        importlib.import_module(f"dercmd.{module}")
    metrics = [c for c in REGISTRY._collector_to_names if getattr(c, "_name", "").startswith("dercmd_")]
    assert len(metrics) > 40
    missing = [
        c._name for c in metrics
        if not re.search(rf"`{c._name}{'_total' if c._type == 'counter' else ''}[`{{]", OPERATIONS)
    ]
    assert missing == []
