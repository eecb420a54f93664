"""The build leaves nothing out: setup.py discovers the packages (the library as ``dercmd``,
every package folder under ``services/`` as ``dercmd.<path>``), and these tests fail on a
folder of modules without ``__init__.py`` (discovery would skip it), a package folder the
discovery misses, or a file beside the modules (a Lua script, a data file) that no package
ships."""

from __future__ import annotations

import fnmatch
import runpy
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_discovery")
SOURCE_ROOTS = (ROOT / "libs" / "dercmd", ROOT / "services")


def _folders() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in [root, *root.rglob("*")]
                  if p.is_dir() and "__pycache__" not in p.parts)


def test_every_folder_of_modules_is_a_package() -> None:
    missing = [f.relative_to(ROOT).as_posix() for f in _folders()
               if any(f.glob("*.py")) and not (f / "__init__.py").is_file()]
    assert missing == [], f"add an __init__.py, or the build leaves these out: {missing}"


def test_every_package_folder_is_discovered() -> None:
    packages = SETUP["packages"](ROOT)
    discovered = {(ROOT / folder).resolve() for folder in packages.values()}
    left_out = [f.relative_to(ROOT).as_posix() for f in _folders() if (f / "__init__.py").is_file() and f.resolve() not in discovered]
    assert left_out == []
    assert packages["dercmd"] == "libs/dercmd"
    assert packages["dercmd.dispatch.backends.ocpp"] == "services/dispatch/backends/ocpp"
    assert packages["dercmd.protocols"] == "libs/dercmd/protocols"
    # The hand-kept list this replaced had left this one out: the wheel's intake could not start.
    assert packages["dercmd.intake.routes"] == "services/intake/routes"


def test_every_other_file_is_package_data() -> None:
    """Lua scripts beside their module, the compatibility table: each is matched by the
    package data of the package folder it is in (or under)."""
    folders = {(ROOT / folder).resolve(): name for name, folder in SETUP["packages"](ROOT).items()}
    unshipped = []
    for root in SOURCE_ROOTS:
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            owners = [f for f in folders if path.resolve().is_relative_to(f)]
            owner = max(owners, key=lambda f: len(f.parts))
            relative = path.resolve().relative_to(owner).as_posix()
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in SETUP["PACKAGE_DATA"]):
                unshipped.append(path.relative_to(ROOT).as_posix())
    assert unshipped == [], f"add a pattern to setup.py's PACKAGE_DATA for: {unshipped}"
    assert any(ROOT.glob("libs/dercmd/state/*.lua")), "the Lua scripts moved: check the test still sees them"


def test_no_package_list_is_kept_by_hand() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project.get("tool", {}).get("setuptools", {})
    assert not {"packages", "package-dir", "package-data"} & set(setuptools)
    # The image builds from the same files.
    assert "setup.py" in (ROOT / "Dockerfile").read_text()


def test_a_folder_under_both_roots_is_refused(tmp_path: Path) -> None:
    for folder in ("libs/dercmd", "libs/dercmd/cli", "services/cli"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    try:
        SETUP["packages"](tmp_path)
    except SystemExit as exc:
        assert "dercmd.cli" in str(exc)
    else:
        raise AssertionError("a service named like a library package was accepted")


def test_a_new_backend_folder_is_discovered(tmp_path: Path) -> None:
    for folder in ("libs/dercmd", "services/dispatch", "services/dispatch/backends", "services/dispatch/backends/newone"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    assert SETUP["packages"](tmp_path)["dercmd.dispatch.backends.newone"] == "services/dispatch/backends/newone"
