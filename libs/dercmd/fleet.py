"""The fleet: entities, what each supports, their cooldowns, and who may see or steer them.

Loaded once per process from the fleet file (``DERCMD_FLEET_FILE``) and the compatibility
table shipped in ``dercmd/data/compatibility.yaml``; both are validated at load, so a typo
stops a service at start-up rather than refusing commands later.
"""

from __future__ import annotations

import fnmatch
from enum import StrEnum
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from .events import CommandType, Model


class EntityKind(StrEnum):
    EV = "EV"
    CP = "CP"
    PV = "PV"


class Role(StrEnum):
    VIEWER = "Viewer"
    CONTRIBUTOR = "Contributor"

    def allows(self, needed: Role) -> bool:
        return needed is Role.VIEWER or self is Role.CONTRIBUTOR


class Entity(Model):
    id: str = ""
    kind: EntityKind
    vendor: str
    backend: str
    vendor_device_id: str | None = None
    declared_types: list[CommandType] | None = None
    assets: list[str] = Field(default_factory=list)
    cooldown_s: float | None = Field(None, ge=0)

    @property
    def device_id(self) -> str:
        """The id the device backend knows this entity by."""
        return self.vendor_device_id or self.id


class CompatibilityRow(Model):
    kind: EntityKind | Literal["*"]
    vendor: str
    backend: str
    types: list[CommandType] | Literal["declared"]

    def matches(self, entity: Entity) -> bool:
        return all(
            pattern == "*" or pattern == actual
            for pattern, actual in ((self.kind, entity.kind), (self.vendor, entity.vendor), (self.backend, entity.backend))
        )

    @property
    def specificity(self) -> int:
        return sum(field != "*" for field in (self.kind, self.vendor, self.backend))


class CompatibilityTable(Model):
    rows: list[CompatibilityRow]

    def supported(self, entity: Entity) -> frozenset[CommandType]:
        matches = [row for row in self.rows if row.matches(entity)]
        if not matches:
            return frozenset()
        best = max(row.specificity for row in matches)
        winners = [row for row in matches if row.specificity == best]
        if len(winners) > 1:
            raise ValueError(f"compatibility rows {winners} are equally specific for entity {entity.id}")
        types = winners[0].types
        if types == "declared":
            # What the device declared, but never more than its kind can do.
            kind_types = self.supported(entity.model_copy(update={"vendor": "\0", "backend": "\0"}))
            return frozenset(entity.declared_types or ()) & kind_types
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
            self.compatibility.supported(entity)
        return self

    @classmethod
    def load(cls, path: str | Path) -> Fleet:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

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
        return command_type in self._supported[entity.id]

    def cooldown_s(self, entity: Entity, default: float) -> float:
        if entity.cooldown_s is not None:
            return entity.cooldown_s
        for key in (f"{entity.kind}/{entity.vendor}", str(entity.kind)):
            if key in self.cooldowns:
                return self.cooldowns[key]
        return default

    @cached_property
    def _supported(self) -> dict[str, frozenset[CommandType]]:
        return {e.id: self.compatibility.supported(e) for e in self.entities.values()}
