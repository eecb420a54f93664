"""What each simulated device received, in order: the ground truth tests and benchmarks
compare dercmd's statuses against."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Receipt:
    entity_id: str
    backend: str
    command_id: str
    type: str
    value: int | None
    received_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "entityId": self.entity_id,
            "backend": self.backend,
            "commandId": self.command_id,
            "type": self.type,
            "value": self.value,
            "receivedAt": self.received_at.isoformat(),
        }


class Recorder:
    def __init__(self) -> None:
        self._by_entity: dict[str, list[Receipt]] = defaultdict(list)
        self.total = 0

    def record(self, entity_id: str, backend: str, command_id: str, type: str, value: int | None, at: datetime) -> None:
        self._by_entity[entity_id].append(Receipt(entity_id, backend, command_id, type, value, at))
        self.total += 1

    def received(self, entity_id: str) -> list[Receipt]:
        return list(self._by_entity.get(entity_id, ()))
