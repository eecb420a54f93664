"""What the arbitration tests share: an injected clock, and a stand-in for the Kafka publisher
that keeps what would have been published (these tests are about the rules in Redis; the
end-to-end tests are about the topics)."""

from __future__ import annotations

from datetime import datetime

from dercmd import topics
from dercmd.arbitration.arbiter import Records
from dercmd.events import CommandStatus, DispatchOrderV1, Event, StatusEventV1


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, Event]] = []

    async def publish_all(self, records: Records) -> None:
        self.records += [(topic.name, event) for topic, event, _ in records]

    def statuses(self, command_id: str) -> list[tuple[CommandStatus, str | None]]:
        return [(e.status, e.reason) for _, e in self.records if isinstance(e, StatusEventV1) and e.command_id == command_id]

    def orders(self) -> list[DispatchOrderV1]:
        return [e for t, e in self.records if t == topics.ORDERS.name and isinstance(e, DispatchOrderV1)]
