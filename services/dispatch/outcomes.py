"""Recording outcomes: each command's delivery state moved on (:mod:`dercmd.state.delivery`)
and the status events it earns published, so that every command gets exactly one terminal
status and the status topic says Sent before the result, whichever of the backend's answer
and its asynchronous result arrives first.

Order of work, everywhere here: publish, then record. A crash in between publishes again
(the event id makes a second copy harmless); recording first could lose the event.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from dercmd import topics
from dercmd.consumer import retrying
from dercmd.events import CommandStatus, DeliveryCheckV1, DispatchOrderV1, Event, StatusEventV1
from dercmd.service import Publisher
from dercmd.state.delivery import Deliveries, Key, Outcome, Stage, Step, Transition

from . import backends, metrics

log = logging.getLogger(__name__)

Records = list[tuple[topics.Topic, Event, str]]
SENT = Outcome(CommandStatus.SENT)
NO_CONFIRMATION = "no_confirmation"


O = TypeVar("O", DispatchOrderV1, DeliveryCheckV1)


def first_of_each(orders: list[O]) -> list[O]:
    """Each command once (a redelivered copy in the same batch: the first speaks for both)."""
    seen: set[str] = set()
    return [o for o in orders if not (o.command_id in seen or seen.add(o.command_id))]


def key(order: DispatchOrderV1 | DeliveryCheckV1) -> Key:
    return (order.entity_id, order.command_id)


def status(entity_id: str, command_id: str, outcome: Outcome, fence: int | None = None) -> tuple[topics.Topic, Event, str]:
    event = StatusEventV1(command_id=command_id, entity_id=entity_id, status=outcome.status, fence=fence,
                          reason=outcome.reason, detail=outcome.detail)
    return (topics.STATUS, event, entity_id)


def order_status(order: DispatchOrderV1, outcome: Outcome) -> tuple[topics.Topic, Event, str]:
    return status(order.entity_id, order.command_id, outcome, order.fence)


def device_result(succeeded: bool, message: str | None) -> Outcome:
    """What a device did, as its backend reports it (a callback, or an answer to a check)."""
    return Outcome(CommandStatus.SUCCEEDED) if succeeded else Outcome(CommandStatus.FAILED, "device_failed", message)


def unconfirmed(detail: str) -> Outcome:
    return Outcome(CommandStatus.FAILED, NO_CONFIRMATION, detail)


class Outcomes:
    def __init__(self, deliveries: Deliveries, publisher: Publisher) -> None:
        self._deliveries = deliveries
        self._publisher = publisher

    async def record(self, accepted: Sequence[tuple[DispatchOrderV1, backends.Accepted]],
                     failed: Sequence[tuple[DispatchOrderV1, Outcome]], resumed: Sequence[tuple[DispatchOrderV1, Transition]]) -> None:
        """What one attempt came to: the accepted ones move on to Sent (and Succeeded, for a
        backend whose answer is the confirmation), the failed ones end, the resumed ones go on
        from their recorded state."""
        moved = await self._deliveries.advance_many([key(o) for o, _ in accepted], Stage.INFLIGHT, Stage.ACCEPTED)
        resumed = list(resumed)
        for (order, answer), t in zip(accepted, moved, strict=True):
            if answer.confirmation is backends.Confirmation.SYNC and t.step is Step.ADVANCED:
                t = Transition(Step.FOUND, Stage.HELD, Outcome(CommandStatus.SUCCEEDED))
            resumed.append((order, t))
        await self.conclude(failed)
        await self.resume(resumed)

    async def resume(self, orders: Sequence[tuple[DispatchOrderV1, Transition]]) -> None:
        """Take commands from their recorded delivery stage to wherever they can get now."""
        sent: Records = []
        advance: list[DispatchOrderV1] = []
        conclude: list[tuple[DispatchOrderV1, Outcome]] = []
        repeat: Records = []
        for order, t in orders:
            if t.stage is Stage.INFLIGHT:
                # An attempt died during the backend call and there is no backend here to ask.
                conclude.append((order, Outcome(CommandStatus.FAILED, "delivery_unknown", "dispatch stopped during the backend call")))
            elif t.stage is Stage.ACCEPTED:
                sent.append(order_status(order, SENT))
                advance.append(order)
            elif t.stage in (Stage.SENT, Stage.MISSING):
                # The result comes by callback. MISSING: the backend took it, but Redis lost the
                # delivery state meanwhile (restarted empty); the callback's result is recorded
                # then, or a delivery check asks for it.
                sent.append(order_status(order, SENT))
            elif t.stage is Stage.HELD and t.outcome is not None:  # the result came first and was held back
                sent.append(order_status(order, SENT))
                conclude.append((order, t.outcome))
            elif t.stage is Stage.DONE and t.outcome is not None:
                repeat.append(order_status(order, t.outcome))
        await self._publisher.publish_all(sent + repeat)
        after = await self._deliveries.advance_many([key(o) for o in advance], Stage.ACCEPTED, Stage.SENT)
        conclude += [(o, a.outcome) for o, a in zip(advance, after, strict=True) if a.stage is Stage.HELD and a.outcome]
        await self.conclude(conclude)

    async def conclude(self, outcomes: Sequence[tuple[DispatchOrderV1, Outcome]]) -> None:
        """Publish terminal statuses, then record them: a crash in between re-publishes them."""
        if not outcomes:
            return
        await self._publisher.publish_all([order_status(order, outcome) for order, outcome in outcomes])
        await self._deliveries.finish_many([(key(order), outcome) for order, outcome in outcomes])

    async def apply_results(self, results: Sequence[tuple[str, str, Outcome]]) -> list[Transition]:
        """Results through the delivery state machine, a callback's or a check's alike: each
        command gets one terminal status, whichever result comes first."""
        moved = await self._deliveries.result_many([((e, c), o) for e, c, o in results])
        events: Records = []
        for (entity_id, command_id, _), t in zip(results, moved, strict=True):
            # DONE found too: a repeated callback after a failed publish must publish again (the
            # event id makes a second copy harmless); it carries the recorded outcome.
            if (t.step is Step.EMIT or t.stage is Stage.DONE) and t.outcome is not None:
                events.append(status(entity_id, command_id, t.outcome))
        await self._publisher.publish_all(events)
        return moved

    async def not_taken(self, orders: Sequence[tuple[DispatchOrderV1, backends.BackendError]]
                        ) -> tuple[list[tuple[DispatchOrderV1, backends.BackendError]], list[tuple[DispatchOrderV1, Transition]]]:
        """The backend did not take these: those that may be claimed and sent again, and
        those to resume from a state another party recorded meanwhile."""
        moved = await retrying(lambda: self._deliveries.retry_many([(key(o), o.fence) for o, _ in orders]), "dispatch retries")
        again: list[tuple[DispatchOrderV1, backends.BackendError]] = []
        resumed: list[tuple[DispatchOrderV1, Transition]] = []
        for (order, error), t in zip(orders, moved, strict=True):
            if t.step is Step.RETRY or t.stage is Stage.MISSING:  # MISSING: Redis lost the claim; claimed again
                again.append((order, error))
            else:
                # SUPERSEDED: taken over while its call was out (arbitration left it to us: done as
                # Canceled); else a result came meanwhile (it was delivered after all): on from it.
                if t.step is Step.SUPERSEDED:
                    metrics.ORDERS.labels("stale").inc()
                resumed.append((order, t))
        return again, resumed

    async def give_up(self, late: Sequence[tuple[DispatchOrderV1, backends.BackendError]]
                      ) -> list[tuple[DispatchOrderV1, backends.BackendError]]:
        """Orders not delivered by their deadline end Failed, recorded as done first (so that a
        redelivered copy is never sent after its Failed; what the device holds is untouched).
        One a newer command made stale was reported by arbitration. Returns those found in
        flight (an attempt died during its call): the device may have them, so they are to be
        asked about, not failed."""
        outcomes = {o.command_id: Outcome(CommandStatus.FAILED, e.reason, f"not delivered by its deadline: {e.detail}") for o, e in late}
        moved = await retrying(lambda: self._deliveries.abandon_many([(key(o), o.fence, outcomes[o.command_id]) for o, _ in late]),
                               "dispatch results")
        publish: Records = []
        resumed: list[tuple[DispatchOrderV1, Transition]] = []
        inflight: list[tuple[DispatchOrderV1, backends.BackendError]] = []
        for (order, error), t in zip(late, moved, strict=True):
            if t.step is Step.ABANDONED:
                publish.append(order_status(order, outcomes[order.command_id]))
            elif t.stage is Stage.INFLIGHT:
                inflight.append((order, backends.DeliveryUnknown("delivery_unknown", f"dispatch stopped during the call ({error.detail})")))
            elif t.step is not Step.STALE:
                resumed.append((order, t))
        metrics.ORDERS.labels("failed").inc(len(publish))
        await retrying(lambda: self._publisher.publish_all(publish), "dispatch results")
        await retrying(lambda: self.record([], [], resumed), "dispatch results")
        return inflight
