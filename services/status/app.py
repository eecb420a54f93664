"""The status service: a faust agent over ``dercmd.commands.status`` that folds events into the
ledger (monotonic, see :mod:`dercmd.ledger`) and publishes each command's new state, keyed by
command id, on the compacted ``dercmd.commands.state``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dercmd import topics
from dercmd.events import StatusEventV1
from dercmd.ledger import Ledger
from dercmd.settings import Settings
from dercmd.streams import StreamApp

from . import metrics

log = logging.getLogger(__name__)


def build(settings: Settings) -> StreamApp:
    app = StreamApp("status", settings, settings.status_port)
    ledger = Ledger(settings.database_url)
    ledger.create_schema()
    app.closers.append(lambda: asyncio.to_thread(ledger.close))

    async def handle(event: StatusEventV1) -> None:
        (applied,) = await asyncio.to_thread(ledger.apply, [event])
        extra = {"command_id": event.command_id, "entity_id": event.entity_id, "status": event.status.value}
        state = applied.state
        if applied.changed:
            metrics.STATUS_EVENTS.labels(event.status.value).inc()
            if state.status.terminal and state.accepted_at is not None:
                metrics.COMPLETION_SECONDS.labels(state.status.value).observe((event.at - state.accepted_at).total_seconds())
            log.info("status", extra={**extra, "reason": event.reason})
        else:
            metrics.IGNORED.inc()
        if applied.current:
            # Also for a repeat: the ledger may have committed while the publish failed, and
            # on a compacted topic a second copy of the same state costs nothing.
            await app.publisher.publish(topics.STATE, state, state.id)

    @app.agent(app.topic_of(topics.STATUS), name="fold")
    async def fold(stream: Any) -> None:
        async for event in stream.events():
            await app.guarded(topics.STATUS, event, handle)

    app.health_checks.append(lambda: asyncio.to_thread(ledger.ping))
    return app
