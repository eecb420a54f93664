"""Each service reads its own settings class: every ``settings.<field>`` a service's code reads
is declared on that class, and every field of the whole stack belongs to some service."""

import ast
from pathlib import Path

import pytest

from dercmd import settings as s

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "intake": s.IntakeSettings,
    "arbitration": s.ArbitrationSettings,
    "dispatch": s.DispatchSettings,
    "status": s.StatusSettings,
    "ocpp_gateway": s.OcppGatewaySettings,
    "simulator": s.SimulatorSettings,
}


def _read_fields(folder: Path) -> set[str]:
    """Attributes read off a name or attribute called ``settings`` (``settings.x``,
    ``self._settings.x``, ``context.settings.x``) anywhere in the folder."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
                if name.lstrip("_") == "settings":
                    found.add(node.attr)
    return found


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_a_service_reads_only_what_its_own_settings_class_declares(service: str) -> None:
    cls = CLASSES[service]
    known = set(s.Settings.model_fields) | {"callback_base_url"}
    read = {f for f in _read_fields(ROOT / "services" / service) if f in known}
    missing = sorted(f for f in read if not hasattr(cls, f) and f not in cls.model_fields)
    assert not missing, f"{service} reads {missing}, not declared on {cls.__name__}"


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_a_service_starts_with_its_own_class(service: str) -> None:
    main = (ROOT / "services" / service / "__main__.py").read_text()
    assert f"get_settings({CLASSES[service].__name__})" in main


def test_every_field_belongs_to_a_service() -> None:
    owned = set().union(*(cls.model_fields for cls in CLASSES.values()))
    assert owned == set(s.Settings.model_fields)


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_every_field_of_a_service_class_is_read_from_its_dercmd_variable(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = CLASSES[service]
    for name, field in cls.model_fields.items():
        if field.annotation in (str,):
            monkeypatch.setenv(f"DERCMD_{name.upper()}", f"set-{name}")
    got = cls()
    for name, field in cls.model_fields.items():
        if field.annotation in (str,):
            assert getattr(got, name) == f"set-{name}", f"{cls.__name__}.{name} does not read DERCMD_{name.upper()}"
