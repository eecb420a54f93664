"""What a backend declares it can carry (:class:`Capabilities`, given to
:func:`~.base.register`), and the check that the compatibility table
(``dercmd/data/compatibility.yaml``, or the fleet file's own ``compatibility``) promises no
more: a command type the table allows for a backend that the backend does not send would be
accepted by intake and fail at dispatch, and a ``nativeWindows`` entry that disagrees with the
backend would leave a window without its revert (or revert one the device ends itself). Either
stops dispatch at start-up with one line naming the row, the backend and the types."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from dercmd.events import CommandType
from dercmd.fleet import CompatibilityRow, CompatibilityTable, EntityKind

ALL_KINDS = frozenset(EntityKind)
#: Stands for every vendor the table does not name.
OTHER_VENDOR = "\0"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can carry: the command ``types`` it sends, to devices of the ``kinds``
    it serves, and whether those devices keep time windows themselves (``native_windows``: a
    windowed limit goes once, with its start and end, and no revert follows)."""

    types: frozenset[CommandType]
    kinds: frozenset[EntityKind] = ALL_KINDS
    native_windows: bool = False


class Declared(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...


def mismatches(table: CompatibilityTable, backends: Iterable[Declared]) -> list[str]:
    """Where ``table`` promises a backend more than it declares, one sentence each: for every
    kind the backend serves and every vendor (each one the table names, and any other), the
    types of the row that wins (for ``types: declared``, the most a device of that kind may
    declare) must all be among the backend's; and ``nativeWindows`` must list exactly the
    backends that declare ``native_windows``."""
    vendors = sorted({row.vendor for row in table.rows if row.vendor != "*"}) + [OTHER_VENDOR]
    found: list[str] = []
    for backend in sorted(backends, key=lambda b: b.name):
        caps = backend.capabilities
        by_row: dict[int, tuple[CompatibilityRow, set[CommandType]]] = {}
        for kind in sorted(caps.kinds):
            for vendor in vendors:
                try:
                    row = table.winner(kind, vendor, backend.name)
                except ValueError:
                    continue  # ambiguous here: the fleet's load refuses it where an entity meets it
                if row is None:
                    continue
                allowed = table.kind_types(kind) if row.types == "declared" else frozenset(row.types)
                extra = allowed - caps.types
                if extra:
                    by_row.setdefault(id(row), (row, set()))[1].update(extra)
        for row, extra in by_row.values():
            found.append(
                f"compatibility row {_row(row)} allows {_types(extra)} on backend {backend.name}, "
                f"which sends only {_types(caps.types) or 'nothing'}"
            )
        listed = backend.name in table.native_windows
        if listed and not caps.native_windows:
            found.append(f"compatibility nativeWindows lists backend {backend.name}, which does not declare native_windows")
        elif caps.native_windows and not listed:
            found.append(f"backend {backend.name} declares native_windows, and compatibility nativeWindows does not list it")
    return found


def refuse_mismatched(table: CompatibilityTable, backends: Iterable[Declared]) -> None:
    """Stop the service (a clear message, exit status 1) while ``table`` and the backends'
    declarations disagree."""
    found = mismatches(table, backends)
    if found:
        raise SystemExit(f"dercmd: refusing to start: {'; '.join(found)}")


def _row(row: CompatibilityRow) -> str:
    types = row.types if row.types == "declared" else f"[{', '.join(t.value for t in row.types)}]"
    return f"{{kind: {row.kind}, vendor: {row.vendor}, backend: {row.backend}, types: {types}}}"


def _types(types: Iterable[CommandType]) -> str:
    return ", ".join(sorted(t.value for t in types))
