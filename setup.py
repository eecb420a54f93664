"""The package list of the one distribution, discovered: the shared library ``libs/dercmd`` is
``dercmd``, and every package folder under ``services/`` is ``dercmd.<path>`` (``services/
dispatch/backends/ocpp`` is ``dercmd.dispatch.backends.ocpp``). A new folder with an
``__init__.py`` is in the build without editing anything; tests/unit/test_build.py checks that
nothing (a package, a Lua script, a data file) is left out. The metadata is in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
#: Where the import root's parts live: the library first, then the services under it.
ROOTS = {"dercmd": "libs/dercmd", "dercmd.": "services"}
#: Files other than Python that every package ships: Redis scripts beside the module that
#: runs them, data files (the compatibility table).
PACKAGE_DATA = ["*.lua", "data/*.yaml"]


def packages(root: Path = HERE) -> dict[str, str]:
    """Every package of the distribution, by dotted name, and its folder (relative to ``root``)."""
    found = {"dercmd": ROOTS["dercmd"]}
    for prefix, folder in (("dercmd.", ROOTS["dercmd"]), ("dercmd.", ROOTS["dercmd."])):
        for name in find_packages(str(root / folder)):
            dotted = prefix + name
            path = f"{folder}/{name.replace('.', '/')}"
            if dotted in found:
                raise SystemExit(f"setup.py: {dotted} is both {found[dotted]} and {path}: rename one")
            found[dotted] = path
    return found


if __name__ == "__main__":
    PACKAGES = packages()
    setup(
        packages=sorted(PACKAGES),
        package_dir=PACKAGES,
        package_data={name: PACKAGE_DATA for name in PACKAGES},
    )
