"""The arbitration service: decides each batch of ``dercmd.commands.accepted`` in one Redis round
trip and publishes what the decisions say."""

from __future__ import annotations

import logging
from collections import Counter

from dercmd import topics
from dercmd.consumer import Item
from dercmd.events import CommandAcceptedV1, utcnow
from dercmd.fleet import Fleet
from dercmd.service import Service
from dercmd.settings import Settings

from . import metrics
from .arbiter import Arbiter, Records, emissions

log = logging.getLogger(__name__)


def build(settings: Settings) -> Service:
    service = Service("arbitration", settings, settings.arbitration_port)
    arbiter = Arbiter(service.redis, Fleet.load(settings.fleet_file), settings.cooldown_s)

    async def handle(items: list[Item[CommandAcceptedV1]]) -> None:
        cmds = [item.event for item in items]
        decisions = await arbiter.decide_many(cmds)
        now = utcnow()
        first: Records = []
        then: Records = []
        outcomes: Counter[str] = Counter()
        for cmd, decision in zip(cmds, decisions, strict=True):
            outcomes[decision.outcome] += 1
            if decision.duplicate:
                # Decided before (we crashed after deciding, or the event was redelivered):
                # re-emit the same outcome; consumers drop what they already have.
                metrics.REDELIVERED.inc()
            if decision.superseded:
                metrics.SUPERSEDED.inc(len(decision.superseded))
            before, after = emissions(cmd, decision, now)
            first += before
            then += after
            log.debug("decided", extra={"command_id": cmd.id, "entity_id": cmd.entity_id, "outcome": decision.outcome,
                                        "fence": decision.fence, "duplicate": decision.duplicate})
        for outcome, count in outcomes.items():
            metrics.DECISIONS.labels(outcome).inc(count)
        # Every Triggered/Canceled is acknowledged before any dispatch order is sent, so the
        # status topic shows Triggered before dispatch can say Sent.
        await service.publisher.publish_all(first)
        await service.publisher.publish_all(then)

    service.consume(topics.ACCEPTED, handle)
    return service
