"""The arbitration service: a faust agent over ``dercmd.commands.accepted``."""

from __future__ import annotations

import logging
from typing import Any

from dercmd import topics
from dercmd.events import CommandAcceptedV1, utcnow
from dercmd.fleet import Fleet
from dercmd.settings import Settings
from dercmd.streams import StreamApp

from . import metrics
from .arbiter import Arbiter, emissions

log = logging.getLogger(__name__)


def build(settings: Settings) -> StreamApp:
    app = StreamApp("arbitration", settings, settings.arbitration_port)
    arbiter = Arbiter(app.redis, Fleet.load(settings.fleet_file), settings.cooldown_s)

    async def handle(cmd: CommandAcceptedV1) -> None:
        decision = await arbiter.decide(cmd)
        metrics.DECISIONS.labels(decision.outcome).inc()
        if decision.duplicate:
            # Decided before (we crashed after deciding, or the event was redelivered):
            # re-emit the same outcome; consumers drop what they already have.
            metrics.REDELIVERED.inc()
        metrics.SUPERSEDED.inc(len(decision.superseded))
        first, then = emissions(cmd, decision, utcnow())
        await app.publisher.publish_all(first)
        await app.publisher.publish_all(then)
        log.info(
            "decided",
            extra={"command_id": cmd.id, "entity_id": cmd.entity_id, "outcome": decision.outcome,
                   "fence": decision.fence, "duplicate": decision.duplicate},
        )

    @app.agent(app.topic_of(topics.ACCEPTED), name="arbitrate")
    async def arbitrate(stream: Any) -> None:
        async for event in stream.events():
            await app.guarded(topics.ACCEPTED, event, handle)

    return app
