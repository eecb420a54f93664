"""The arbitration service: decides each batch of ``dercmd.commands.accepted`` (new commands
and cancels) in one Redis round trip and publishes what the decisions say; and, in every
replica, polls the due-index for scheduled starts and window ends (see :mod:`dercmd.state.due`)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

from dercmd import topics
from dercmd.consumer import Item, retrying
from dercmd.events import CommandAcceptedV1, CommandCancelV1
from dercmd.fleet import Fleet
from dercmd.kafka import Publisher
from dercmd.service import Service
from dercmd.settings import ArbitrationSettings
from dercmd.state.due import Entry, bucket_of

from . import metrics
from .arbiter import Arbiter, Outcome, Records, cancel_emissions, emissions, fire_emissions

log = logging.getLogger(__name__)

#: Most due entries taken from each bucket of the index at once.
TAKE_LIMIT = 500


class Arbitration:
    def __init__(self, publisher: Publisher, arbiter: Arbiter, tick_s: float, lead_ms: int = 0) -> None:
        self._publisher = publisher
        self._arbiter = arbiter
        self._tick_s = tick_s
        self._lead_ms = lead_ms

    async def _publish(self, first: Records, then: Records) -> None:
        # Every Triggered/Canceled is acknowledged before any dispatch order is sent, so the
        # status topic shows Triggered before dispatch can say Sent.
        await self._publisher.publish_all(first)
        await self._publisher.publish_all(then)

    async def handle(self, items: list[Item[CommandAcceptedV1 | CommandCancelV1]]) -> None:
        events = [item.event for item in items]
        decisions = await self._arbiter.decide_many(events)
        now = self._arbiter.now()
        first: Records = []
        then: Records = []
        outcomes: Counter[str] = Counter()
        for ev, decision in zip(events, decisions, strict=True):
            if decision.duplicate:
                # Decided before (we crashed after deciding, or the event was redelivered):
                # re-emit the same outcome; consumers drop what they already have.
                metrics.REDELIVERED.inc()
            if isinstance(ev, CommandCancelV1):
                metrics.CANCELS.labels(decision.outcome).inc()
                before, after = cancel_emissions(ev, decision, now)
                log.info("cancel", extra={"command_id": ev.command_id, "entity_id": ev.entity_id, "reason": ev.reason,
                                          "outcome": decision.outcome, "revert": decision.revert})
            else:
                outcomes[decision.outcome] += 1
                before, after = emissions(ev, decision, now)
                log.debug("decided", extra={"command_id": ev.id, "entity_id": ev.entity_id, "outcome": decision.outcome,
                                            "fence": decision.fence, "duplicate": decision.duplicate})
            if decision.superseded:
                metrics.SUPERSEDED.inc(len(decision.superseded))
            first += before
            then += after
        for outcome, count in outcomes.items():
            metrics.DECISIONS.labels(outcome).inc(count)
        await self._publish(first, then)

    # -- the due-index -------------------------------------------------------------------

    async def tick_forever(self) -> None:
        while True:
            try:
                taken = await retrying(lambda: self.tick(), "due-index")
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: the entries' leases run out and they are taken again
                log.exception("due-index round failed")
                taken = 0
            if taken < TAKE_LIMIT:  # a full round means more are waiting: go on at once
                await asyncio.sleep(self._tick_s)

    async def tick(self) -> int:
        """One round: take what has come due, act on it, publish, settle. The most entries
        taken from one bucket."""
        entries = await self._arbiter.due.take(TAKE_LIMIT, lead_ms=self._lead_ms)
        if not entries:
            return 0
        decisions = await self._arbiter.fire(entries)
        now = self._arbiter.now()
        first: Records = []
        then: Records = []
        done: list[Entry] = []
        later: list[tuple[Entry, int]] = []
        for entry, decision in zip(entries, decisions, strict=True):
            metrics.DUE.labels("start" if entry.kind == "s" else "end", decision.outcome).inc()
            before, after = fire_emissions(entry, decision, now, hold=not self._arbiter.holds_windows(entry.entity_id))
            first += before
            then += after
            if decision.outcome is Outcome.WAITING and decision.at_ms:
                later.append((entry, decision.at_ms))
                continue
            done.append(entry)
            if entry.kind == "s" and decision.outcome is Outcome.ACTIVATED:
                late = now.timestamp() * 1000 - entry.due  # negative: ahead, within the lead
                metrics.START_LATENESS.observe(max(0.0, late / 1000))
        await self._publish(first, then)
        await self._arbiter.due.settle(done, later)
        return _most_per_bucket(entries)


def _most_per_bucket(entries: Sequence[Entry]) -> int:
    return max(Counter(bucket_of(e.entity_id) for e in entries).values())


def build(settings: ArbitrationSettings) -> Service:
    service = Service("arbitration", settings, settings.arbitration_port)
    arbiter = Arbiter(service.redis, Fleet.load(settings.fleet_file), settings.cooldown_s)
    arbitration = Arbitration(service.publisher, arbiter, settings.due_tick_ms / 1000, settings.due_lead_ms)
    service.consume(topics.ACCEPTED, arbitration.handle)
    service.background("due-index poller", arbitration.tick_forever)
    return service
