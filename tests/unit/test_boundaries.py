"""The house has two floors: services (``services/<name>``, importable as ``dercmd.<name>``)
over the shared library (``libs/dercmd``). Imports go downward only: a service imports the
library and its own package, never another service; the library imports no service.

Every module is parsed (never imported), so an import anywhere in it counts, also one inside a
function; ``from dercmd import dispatch`` and relative imports (``from ...dispatch import x``)
are resolved to the module they name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "libs" / "dercmd"
SERVICES_DIR = ROOT / "services"
SERVICES = frozenset(p.name for p in SERVICES_DIR.iterdir() if (p / "__init__.py").is_file())

#: Library modules that still import a service, each with why, to be emptied, not filled.
KNOWN_LIBRARY_VIOLATIONS: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute, resolved
    relative: bool = False  # written relative (``from ..x import y``): the ``..x`` it names


def module_name(path: Path) -> str:
    """The dotted name a source file is imported as."""
    if path.is_relative_to(LIBRARY):
        parts = ["dercmd", *path.relative_to(LIBRARY).with_suffix("").parts]
    else:
        parts = ["dercmd", *path.relative_to(SERVICES_DIR).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, *, is_package: bool) -> list[Import]:
    """Every module ``source`` (the module ``module``) imports, absolute; for ``from X import
    n`` both ``X`` and ``X.n`` (``n`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                up = node.level - 1
                if up >= len(base):
                    found.append(Import(node.lineno, "." * node.level + (node.module or "")))  # above the root
                    continue
                base = base[: len(base) - up]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(Import(node.lineno, target, relative=bool(node.level)))
            found += [Import(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(Import(node.lineno, node.args[0].value))
    return found


def service_of(module: str) -> str | None:
    """The service a ``dercmd.*`` module belongs to, None for the library (or outside dercmd)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "dercmd" and parts[1] in SERVICES:
        return parts[1]
    return None


def violations(path: Path) -> list[str]:
    """What ``path`` imports across the boundaries, as ``file:line: module``."""
    module = module_name(path)
    own = service_of(module)
    where = path.relative_to(ROOT).as_posix()
    found: dict[tuple[int, str], str] = {}  # one finding of each kind per line: the first names the module

    def note(line: int, kind: str, text: str) -> None:
        found.setdefault((line, kind), f"{where}:{line}: {text}")

    for imp in imports(path.read_text(), module, is_package=path.name == "__init__.py"):
        if imp.module.startswith("."):
            note(imp.line, "root", f"a relative import above dercmd ({imp.module})")
            continue
        target = service_of(imp.module)
        if own is None and target is not None:
            note(imp.line, "library", f"the library imports the service module {imp.module}")
        elif own is not None and target is not None and target != own:
            note(imp.line, "service", f"service {own} imports {imp.module} of service {target}")
        if own is not None and imp.relative and not (imp.module == f"dercmd.{own}" or imp.module.startswith(f"dercmd.{own}.")):
            # ``from .. import settings`` in a service: it reaches the library by its absolute name.
            note(imp.line, "climb", f"a relative import climbs out of service {own} ({imp.module})")
    return sorted(found.values())


def _sources(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


LIBRARY_MODULES = _sources(LIBRARY)
SERVICE_MODULES = _sources(SERVICES_DIR)


def _param(path: Path) -> object:
    where = path.relative_to(ROOT).as_posix()
    reason = KNOWN_LIBRARY_VIOLATIONS.get(where)
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(path, id=where, marks=marks)


def test_there_is_something_to_check() -> None:
    assert len(SERVICES) >= 6 and len(LIBRARY_MODULES) > 20 and len(SERVICE_MODULES) > 40


@pytest.mark.parametrize("path", [_param(p) for p in SERVICE_MODULES])
def test_a_service_imports_the_library_and_itself_only(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize("path", [_param(p) for p in LIBRARY_MODULES])
def test_the_library_imports_no_service(path: Path) -> None:
    assert violations(path) == []


# -- the checker itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("from dercmd.dispatch.backends.ocpp import OcppSettings", "dercmd.ocpp_gateway.app", False,
         {"dercmd.dispatch.backends.ocpp", "dercmd.dispatch.backends.ocpp.OcppSettings"}),
        ("import dercmd.arbitration.arbiter", "dercmd.bench.redismem", False, {"dercmd.arbitration.arbiter"}),
        ("from dercmd import dispatch", "dercmd.intake.app", False, {"dercmd", "dercmd.dispatch"}),
        ("from ..bulk_rest import translate", "dercmd.dispatch.backends.ocpp", True,
         {"dercmd.dispatch.backends.bulk_rest", "dercmd.dispatch.backends.bulk_rest.translate"}),
        ("from ...status import sweeper", "dercmd.dispatch.backends", True, {"dercmd.status", "dercmd.status.sweeper"}),
        ("def f():\n    import dercmd.status.app\n", "dercmd.dispatch.app", False, {"dercmd.status.app"}),
        ("importlib.import_module('dercmd.simulator.app')", "dercmd.launcher", False, {"dercmd.simulator.app"}),
    ],
)
def test_imports_are_resolved(source: str, module: str, is_package: bool, expected: set[str]) -> None:
    assert {i.module for i in imports(source, module, is_package=is_package)} == expected


def test_a_crossing_import_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services = tmp_path / "services"
    library = tmp_path / "libs" / "dercmd"
    for folder in (services / "intake", services / "dispatch", library):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    (services / "intake" / "app.py").write_text("from dercmd.dispatch.app import x\nfrom dercmd.fleet import Fleet\n")
    (services / "dispatch" / "app.py").write_text("from .. import settings\nfrom . import metrics\n")
    (library / "bench.py").write_text("from dercmd.intake import app\n")
    monkeypatch.setattr(__name__ + ".ROOT", tmp_path)
    monkeypatch.setattr(__name__ + ".LIBRARY", library)
    monkeypatch.setattr(__name__ + ".SERVICES_DIR", services)
    monkeypatch.setattr(__name__ + ".SERVICES", frozenset({"intake", "dispatch"}))
    assert violations(services / "intake" / "app.py") == [
        "services/intake/app.py:1: service intake imports dercmd.dispatch.app of service dispatch"]
    assert violations(services / "dispatch" / "app.py") == [
        "services/dispatch/app.py:1: a relative import climbs out of service dispatch (dercmd)"]
    assert violations(library / "bench.py") == ["libs/dercmd/bench.py:1: the library imports the service module dercmd.intake"]
