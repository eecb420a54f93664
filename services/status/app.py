"""The status service: folds each batch of ``dercmd.commands.status`` into the ledger, a
command's events together, in transactions of up to ``EVENTS_PER_TRANSACTION`` (monotonic, see
:mod:`dercmd.ledger`), and publishes each command's new state, keyed by command id, on the
compacted ``dercmd.commands.state``. It is off the latency path, so its consumer lingers
between small batches (``DERCMD_STATUS_LINGER_MS``)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from dercmd import topics
from dercmd.consumer import Item
from dercmd.events import CommandStatus, StatusEventV1
from dercmd.ledger import Applied, Ledger
from dercmd.service import Service
from dercmd.settings import StatusSettings

from . import metrics
from .sweeper import Sweeper

log = logging.getLogger(__name__)

#: Most status events folded in one ledger transaction (a batch may hold more): a SQLite
#: ledger's writers take turns, and a longer transaction kept intake waiting longer.
EVENTS_PER_TRANSACTION = 300


def build(settings: StatusSettings) -> Service:
    service = Service("status", settings, settings.status_port)
    ledger = Ledger(settings.database_url)
    service.starters.append(lambda: asyncio.to_thread(ledger.create_schema))
    service.closers.append(lambda: asyncio.to_thread(ledger.close))
    service.health_checks.append(lambda: asyncio.to_thread(ledger.ping))

    completion = {status: metrics.COMPLETION_SECONDS.labels(status.value) for status in CommandStatus if status.terminal}

    async def handle(items: list[Item[StatusEventV1]]) -> None:
        # Each command's events side by side, in their order (a stable sort), so that one
        # transaction reads and updates its row once; in transactions of at most
        # EVENTS_PER_TRANSACTION, so that intake's writes to a SQLite ledger get their turn
        # between them (a crash in between redelivers the batch; a folded event is dropped
        # the second time).
        events = sorted((item.event for item in items), key=lambda e: e.command_id)
        applied: list[Applied] = []
        for start in range(0, len(events), EVENTS_PER_TRANSACTION):
            applied += await asyncio.to_thread(ledger.apply, events[start : start + EVENTS_PER_TRANSACTION])
        # The latest state of each command in this batch: on a compacted topic only the last
        # one counts, so the states a batch passed through are not published one by one (a
        # command's events are side by side, so its last one wins).
        latest: dict[str, Applied] = {}
        folded: Counter[str] = Counter()
        ignored = refused = 0
        for event, result in zip(events, applied, strict=True):
            if result.changed:
                folded[event.status.value] += 1
                accepted_at = result.accepted_at
                if event.status.terminal and accepted_at is not None:
                    completion[event.status].observe((event.at - accepted_at).total_seconds())
                log.debug("status", extra={"command_id": event.command_id, "entity_id": event.entity_id,
                                           "status": event.status.value, "reason": event.reason})
            elif result.foreign:
                refused += 1
                log.warning("status event for another entity refused", extra={
                    "command_id": event.command_id, "entity_id": event.entity_id, "status": event.status.value})
            else:
                ignored += 1
            if result.current:
                # Also for a repeat: the ledger may have committed while the publish failed, and
                # on a compacted topic a second copy of the same state costs nothing.
                latest[event.command_id] = result
        for status, count in folded.items():
            metrics.STATUS_EVENTS.labels(status).inc(count)
        if ignored:
            metrics.IGNORED.inc(ignored)
        if refused:
            metrics.REFUSED.inc(refused)
        await service.publisher.publish_all([(topics.STATE, r.state, command_id) for command_id, r in latest.items()])

    consumer = service.consume(topics.STATUS, handle, linger_ms=settings.status_linger_ms,
                               max_records=settings.status_batch_max_records)
    sweeper = Sweeper(settings, ledger, service.publisher, service.redis, consumer.group_offsets)
    service.background("sweeper", sweeper.run)
    return service
