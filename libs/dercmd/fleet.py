"""The fleet: entities, what each supports, their cooldowns, and who may see or steer them.

Loaded once per process from the fleet file (``DERCMD_FLEET_FILE``) and the compatibility
table shipped in ``dercmd/data/compatibility.yaml``; both are validated at load, so a typo
stops a service at start-up rather than refusing commands later.

Fleets reach 10^5 entities, loaded by every service: entities are slotted dataclasses, what
they support is resolved once per distinct (kind, vendor, backend, declared types), and
:meth:`Fleet.load` builds the document from the parser's events (never the whole node tree) and
leaves no garbage-pinned memory behind.
"""

from __future__ import annotations

import fnmatch
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic.dataclasses import dataclass

from .events import CommandType, Model

#: libyaml's parser when PyYAML was built with it (about ten times faster), else pure Python.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class EntityKind(StrEnum):
    EV = "EV"
    CP = "CP"
    PV = "PV"


class Role(StrEnum):
    VIEWER = "Viewer"
    CONTRIBUTOR = "Contributor"

    def allows(self, needed: Role) -> bool:
        return needed is Role.VIEWER or self is Role.CONTRIBUTOR


@dataclass(frozen=True, slots=True, config=ConfigDict(alias_generator=Model.model_config["alias_generator"],
                                                     populate_by_name=True, extra="forbid"))
class Entity:
    """One device or site. A validated slotted dataclass rather than a model: a fleet holds
    hundreds of thousands and every service keeps them all."""

    kind: EntityKind
    vendor: str
    backend: str
    id: str = ""
    vendor_device_id: str | None = None
    declared_types: tuple[CommandType, ...] | None = None
    assets: tuple[str, ...] = ()
    cooldown_s: Annotated[float, Field(ge=0)] | None = None
    #: An OCPP charge point's password hash (``dercmd ocpp-password`` makes one): it must
    #: connect with HTTP Basic and that password (OCPP 1.6 security profile 1). None: it may
    #: connect without (profile 0, refused in production).
    ocpp_password_hash: str | None = None

    @property
    def device_id(self) -> str:
        """The id the device backend knows this entity by."""
        return self.vendor_device_id or self.id


class CompatibilityRow(Model):
    kind: EntityKind | Literal["*"]
    vendor: str
    backend: str
    types: list[CommandType] | Literal["declared"]

    def matches(self, kind: str, vendor: str, backend: str) -> bool:
        return all(
            pattern == "*" or pattern == actual
            for pattern, actual in ((self.kind, kind), (self.vendor, vendor), (self.backend, backend))
        )

    @property
    def specificity(self) -> int:
        return sum(field != "*" for field in (self.kind, self.vendor, self.backend))


class CompatibilityTable(Model):
    rows: list[CompatibilityRow]
    native_windows: frozenset[str] = frozenset()

    def supported(self, entity: Entity) -> frozenset[CommandType]:
        return self._supported(entity.kind, entity.vendor, entity.backend, entity.declared_types, entity.id)

    def winner(self, kind: str, vendor: str, backend: str, entity_id: str = "") -> CompatibilityRow | None:
        """The most specific row matching, None when none does; two equally specific rows
        are a ValueError."""
        matches = [row for row in self.rows if row.matches(kind, vendor, backend)]
        if not matches:
            return None
        best = max(row.specificity for row in matches)
        winners = [row for row in matches if row.specificity == best]
        if len(winners) > 1:
            raise ValueError(f"compatibility rows {winners} are equally specific for entity {entity_id}")
        return winners[0]

    def kind_types(self, kind: str) -> frozenset[CommandType]:
        """What a kind can do at most: its row for any vendor and backend (the bound of
        ``types: declared``)."""
        return self._supported(kind, "\0", "\0", None, "")

    def _supported(
        self, kind: str, vendor: str, backend: str, declared: tuple[CommandType, ...] | None, entity_id: str
    ) -> frozenset[CommandType]:
        row = self.winner(kind, vendor, backend, entity_id)
        if row is None:
            return frozenset()
        types = row.types
        if types == "declared":
            # What the device declared, but never more than its kind can do.
            kind_types = self._supported(kind, "\0", "\0", None, entity_id)
            return frozenset(declared or ()) & kind_types
        return frozenset(types)

    @classmethod
    def bundled(cls) -> CompatibilityTable:
        text = resources.files("dercmd").joinpath("data/compatibility.yaml").read_text()
        return cls.model_validate(yaml.safe_load(text))


class Grant(Model):
    entities: str  # glob over entity ids
    role: Role


class Fleet(Model):
    entities: dict[str, Entity]
    tokens: dict[str, list[Grant]] = Field(default_factory=dict)
    cooldowns: dict[str, float] = Field(default_factory=dict)
    compatibility: CompatibilityTable = Field(default_factory=CompatibilityTable.bundled)
    # What entities support, by (kind, vendor, backend, declared types): a fleet has few.
    _support: dict[tuple[Any, ...], frozenset[CommandType]] = PrivateAttr(default_factory=dict)

    @field_validator("entities", mode="before")
    @classmethod
    def _ids_from_keys(cls, value: object) -> object:
        if isinstance(value, dict):
            return {key: {**entry, "id": key} for key, entry in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> Fleet:
        for key in self.cooldowns:
            kind, _, _vendor = key.partition("/")
            if kind not in EntityKind.__members__:
                raise ValueError(f"cooldowns key {key!r} must be KIND or KIND/vendor")
        # Fail now, not on the first command, if the table is ambiguous for an entity.
        for entity in self.entities.values():
            self._supported(entity)
        return self

    @classmethod
    def load(cls, path: str | Path) -> Fleet:
        text = Path(path).read_text()
        with _gc_paused():
            try:
                document = _built_from_events(text)
            except _NeedsComposer:
                # What the parser builds is freed by reference counting; only the copies made
                # by _detached are kept, so the parser's scratch memory goes back to the system.
                document = _detached(yaml.load(text, Loader=_YAML_LOADER), {})
            return cls.model_validate(document)

    def entity(self, entity_id: str) -> Entity | None:
        return self.entities.get(entity_id)

    def role(self, token: str, entity_id: str) -> Role | None:
        """The strongest role a token holds on an entity, or None."""
        roles = [g.role for g in self.tokens.get(token, ()) if fnmatch.fnmatchcase(entity_id, g.entities)]
        if not roles:
            return None
        return Role.CONTRIBUTOR if Role.CONTRIBUTOR in roles else Role.VIEWER

    def knows_token(self, token: str) -> bool:
        return token in self.tokens

    def supports(self, entity: Entity, command_type: CommandType) -> bool:
        return command_type in self._supported(entity)

    def keeps_windows(self, entity: Entity) -> bool:
        """Whether the entity's backend keeps time windows natively (no revert from dercmd)."""
        return entity.backend in self.compatibility.native_windows

    def cooldown_s(self, entity: Entity, default: float) -> float:
        if entity.cooldown_s is not None:
            return entity.cooldown_s
        for key in (f"{entity.kind}/{entity.vendor}", str(entity.kind)):
            if key in self.cooldowns:
                return self.cooldowns[key]
        return default

    def _supported(self, entity: Entity) -> frozenset[CommandType]:
        key = (entity.kind, entity.vendor, entity.backend, entity.declared_types)
        types = self._support.get(key)
        if types is None:
            types = self._support[key] = self.compatibility.supported(entity)
        return types


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building a million objects at once makes the cyclic collector rescan the growing heap
    again and again (a 10^5-entity fleet took minutes instead of seconds). Loading creates no
    reference cycles that need it meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _NeedsComposer(Exception):
    """The document uses what :func:`_built_from_events` leaves to PyYAML's own loader."""


def _built_from_events(text: str) -> Any:
    """The document, built straight from libyaml's parse events, as ``yaml.safe_load`` builds
    it, with one string object per distinct string.

    ``yaml.load`` composes the whole node tree first (every scalar a node with two marks),
    several times the document's final size: 100,000 entities peaked at ~450 MB to keep ~60.
    From the events, only the document itself is ever held: peak ~70 MB, and twice as fast.
    Merge keys (``<<``) and tagged collections raise :class:`_NeedsComposer` (the caller then
    uses PyYAML's loader); anchors and aliases are kept.
    """
    loader = _YAML_LOADER(text)
    strings: dict[str, str] = {}
    anchors: dict[str, Any] = {}
    open_: list[list[Any]] = []  # [container, its pending key or _NO_KEY] for each open collection
    root: Any = None
    in_document = False

    def add(value: Any) -> None:
        nonlocal root
        if not open_:
            root = value
            return
        top = open_[-1]
        if type(top[0]) is list:
            top[0].append(value)
        elif top[1] is _NO_KEY:
            if isinstance(value, dict | list):
                raise _NeedsComposer("a collection as a key")
            top[1] = value
        else:
            top[0][top[1]] = value
            top[1] = _NO_KEY

    try:
        while not isinstance(event := loader.get_event(), yaml.StreamEndEvent):
            if isinstance(event, yaml.ScalarEvent):
                tag = event.tag
                if tag is None or tag == "!":
                    tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
                if tag == _STR:
                    value = _own(event.value, strings)
                else:
                    construct = loader.yaml_constructors.get(tag)
                    if construct is None or tag == _MERGE:
                        raise _NeedsComposer(tag)
                    value = construct(loader, yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style))
            elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                if event.tag is not None and not event.implicit:
                    raise _NeedsComposer(event.tag)
                value = {} if isinstance(event, yaml.MappingStartEvent) else []
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                open_.pop()
                continue
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in anchors:
                    raise _NeedsComposer(event.anchor)  # PyYAML says what is wrong with it
                add(anchors[event.anchor])
                continue
            elif isinstance(event, yaml.DocumentStartEvent):
                if in_document:
                    raise _NeedsComposer("more than one document")
                in_document = True
                continue
            else:  # the stream's start, the document's end
                continue
            if event.anchor is not None:
                anchors[event.anchor] = value
            add(value)
            if isinstance(event, yaml.CollectionStartEvent):
                open_.append([value, _NO_KEY])
    finally:
        loader.dispose()
    return root


_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_NO_KEY = object()  # a mapping waiting for its next key


def _own(value: str, strings: dict[str, str]) -> str:
    """One object per distinct string, a copy of its own: not pinned among the parser's objects
    (``str()``, slicing and joining would return the same object)."""
    copy = strings.get(value)
    if copy is None:
        copy = strings[value] = value.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
    return copy


def _detached(value: Any, strings: dict[str, str]) -> Any:
    """A copy of a parsed document with strings of its own, one object per distinct string.

    libyaml's node tree takes several times the document's final size; the strings it
    allocated sit among those nodes, and as long as they live (ids, vendors) the allocator
    cannot give any of that memory back: 100,000 entities kept ~330 MB instead of ~60 MB.
    """
    if isinstance(value, str):
        return _own(value, strings)
    if isinstance(value, dict):
        return {_detached(k, strings): _detached(v, strings) for k, v in value.items()}
    if isinstance(value, list):
        return [_detached(v, strings) for v in value]
    return value
