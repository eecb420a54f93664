"""What each simulated device received, in order: the ground truth tests and benchmarks
compare dercmd's statuses against.

Every receipt is stored once, in one list in receive order; its ``seq`` is its position
in that list plus one. Per entity only the positions are kept, for ``received(entity)``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Receipt:
    seq: int  # global receive order, from 1
    entity_id: str
    backend: str
    command_id: str
    type: str
    value: int | None
    received_at: datetime
    percentage: int | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    assets: tuple[str, ...] | None = None  # None: the whole device
    revert_of: str | None = None  # a revert: the command whose window it ends

    def to_json(self) -> dict[str, Any]:
        """``value`` always (null when the type takes none); the other fields where given."""
        out: dict[str, Any] = {
            "seq": self.seq,
            "entityId": self.entity_id,
            "backend": self.backend,
            "commandId": self.command_id,
            "type": self.type,
            "value": self.value,
        }
        for key, field in (("percentage", self.percentage), ("revertOf", self.revert_of)):
            if field is not None:
                out[key] = field
        for key, when in (("startAt", self.start_at), ("endAt", self.end_at)):
            if when is not None:
                out[key] = when.isoformat()
        if self.assets is not None:
            out["assets"] = list(self.assets)
        out["receivedAt"] = self.received_at.isoformat()
        return out


class Recorder:
    def __init__(self) -> None:
        self._all: list[Receipt] = []
        self._by_entity: dict[str, list[int]] = defaultdict(list)  # positions in _all

    @property
    def total(self) -> int:
        return len(self._all)

    def record(
        self, entity_id: str, backend: str, command_id: str, type: str, value: int | None, at: datetime, *,
        percentage: int | None = None, start_at: datetime | None = None, end_at: datetime | None = None,
        assets: Sequence[str] | None = None, revert_of: str | None = None,
    ) -> None:
        position = len(self._all)
        self._all.append(Receipt(
            position + 1, entity_id, backend, command_id, type, value, at, percentage, start_at, end_at,
            tuple(assets) if assets is not None else None, revert_of,
        ))
        self._by_entity[entity_id].append(position)

    def received(self, entity_id: str) -> list[Receipt]:
        """What one device received, in order."""
        return [self._all[i] for i in self._by_entity.get(entity_id, ())]

    def since(self, after: int, limit: int) -> list[Receipt]:
        """Up to ``limit`` receipts with ``seq > after``, in receive order."""
        start = max(after, 0)
        return self._all[start : start + max(limit, 0)]
