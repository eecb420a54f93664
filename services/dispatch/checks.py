"""Asking backends what became of commands: deliveries whose fate is unknown (no answer came),
and delivery checks (:class:`DeliveryCheckV1`, from the status service's sweeper: a command
left ``Sent`` past its deadline)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence

from dercmd.consumer import retrying
from dercmd.events import CommandStatus, DeliveryCheckV1, DispatchOrderV1
from dercmd.fleet import Fleet
from dercmd.service import Publisher
from dercmd.state.delivery import Deliveries, Outcome, Stage

from . import backends, metrics
from .attempt import Attempt, Failure
from .outcomes import NO_CONFIRMATION, Outcomes, Records, device_result, first_of_each, key, status, unconfirmed
from .pool import BackendPool

log = logging.getLogger(__name__)


class Checks:
    def __init__(self, pool: BackendPool, deliveries: Deliveries, outcomes: Outcomes, publisher: Publisher, fleet: Fleet) -> None:
        self._pool = pool
        self._deliveries = deliveries
        self._outcomes = outcomes
        self._publisher = publisher
        self._fleet = fleet

    async def resolve(self, backend: backends.DeviceBackend, orders: list[Failure]) -> Attempt:
        """Deliveries whose fate is unknown: the backend is asked (it reads the device back where
        its protocol can). Delivered: on as if it had answered; never received: sent again;
        the backend cannot say: ``Failed: delivery_unknown`` (never sent blindly again)."""
        result = Attempt()
        asked = await ask(backend, [backends.Query(self._fleet.entities[o.entity_id], o.command_id, o) for o, _ in orders])
        findings: list[backends.CommandOutcome | None] = list(asked) if isinstance(asked, list) else [None] * len(orders)
        never: list[Failure] = []
        found: list[tuple[tuple[str, str], Outcome]] = []
        for (order, error), finding in zip(orders, findings, strict=True):
            if finding is None:
                metrics.UNKNOWN_DELIVERIES.labels(backend.name, "unresolved").inc()
                result.failed.append((order, Outcome(CommandStatus.FAILED, "delivery_unknown", error.detail)))
            elif finding.finding is backends.Finding.UNKNOWN:
                metrics.UNKNOWN_DELIVERIES.labels(backend.name, "never_received").inc()
                # Sent as an ordinary order from here on (a recovered one is not asked about again).
                never.append((order.model_copy(update={"recovered": False}),
                              backends.NotDelivered("delivery_unknown", f"{backend.name} never got it: {error.detail}")))
            else:
                metrics.UNKNOWN_DELIVERIES.labels(backend.name, "delivered").inc()
                result.accepted.append((order, backends.Accepted(backends.Confirmation.ASYNC)))
                if finding.finding is not backends.Finding.PENDING:
                    found.append((key(order), device_result(finding.finding is backends.Finding.SUCCEEDED, finding.message)))
        if found:  # held as the result until Sent is out (the state is still inflight)
            await retrying(lambda: self._deliveries.result_many(found), "dispatch results")
        if never:
            again, resumed = await self._outcomes.not_taken(never)
            result.again += again
            result.resumed += resumed
        return result

    async def check(self, checks: list[DeliveryCheckV1]) -> None:
        """Commands left ``Sent`` past their deadline: where the delivery state says the
        command is open (``sent``, or ``accepted`` with Sent on its way), the backend's word on
        it, or ``Failed: no_confirmation`` when it has none, goes through the state machine
        like a callback's result; a late genuine callback then finds it done and republishes
        the recorded outcome. Where the command already ended, the recorded outcome is
        published again (the sweeper only asks while the ledger still says Sent, so its
        terminal event was lost; the same event id makes a second copy harmless). Anything
        else (not claimed, in flight, a result held for the sender) is left alone."""
        checks = first_of_each(checks)
        found = await retrying(lambda: self._deliveries.peek_many([key(c) for c in checks]), "dispatch checks")
        open_: list[DeliveryCheckV1] = []
        forgotten: set[str] = set()
        again: Records = []
        for check, t in zip(checks, found, strict=True):
            if t.stage in (Stage.SENT, Stage.ACCEPTED, Stage.MISSING):
                # MISSING: nothing in Redis (it restarted empty, or this was never claimed):
                # asked too, and decided only if the backend has a result for it.
                open_.append(check)
                if t.stage is Stage.MISSING:
                    forgotten.add(check.command_id)
            elif t.stage is Stage.DONE and t.outcome is not None:
                metrics.CHECKS.labels("republished").inc()
                again.append(status(check.entity_id, check.command_id, t.outcome))
            else:
                metrics.CHECKS.labels("not_open").inc()
                log.info("delivery check of a command not open", extra={"command_id": check.command_id,
                                                                        "entity_id": check.entity_id, "state": t.label})
        outcomes = await self._outcomes_of(open_)
        if forgotten:
            known = [(c, o) for c, o in zip(open_, outcomes, strict=True)
                     if c.command_id not in forgotten or o.reason != NO_CONFIRMATION]
            metrics.CHECKS.labels("not_open").inc(len(open_) - len(known))
            open_, outcomes = [c for c, _ in known], [o for _, o in known]
        for check, outcome in zip(open_, outcomes, strict=True):
            _count_check(check, outcome)
        results = [(c.entity_id, c.command_id, o) for c, o in zip(open_, outcomes, strict=True)]
        await retrying(lambda: self._publisher.publish_all(again), "dispatch checks")
        await retrying(lambda: self._outcomes.apply_results(results), "dispatch checks")

    async def _outcomes_of(self, checks: Sequence[DeliveryCheckV1]) -> list[Outcome]:
        """What became of each command, per its backend (one query per backend, concurrently)."""
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, check in enumerate(checks):
            groups[self._pool.name_for(check.entity_id)].append(i)
        outcomes: list[Outcome] = [unconfirmed("")] * len(checks)  # each replaced below

        async def ask_one(name: str | None, positions: list[int]) -> None:
            backend = self._pool.backends[name] if name is not None else None
            # (an entity outside the fleet has no backend here, and nothing to build a query from)
            queries = [backends.Query(self._fleet.entities[checks[i].entity_id], checks[i].command_id) for i in positions] if backend else []
            asked = await ask(backend, queries)
            found = [_from_finding(a, name) for a in asked] if isinstance(asked, list) else [unconfirmed(asked)] * len(positions)
            for i, outcome in zip(positions, found, strict=True):
                outcomes[i] = outcome

        await asyncio.gather(*(ask_one(name, positions) for name, positions in groups.items()))
        return outcomes


async def ask(backend: backends.DeviceBackend | None, queries: list[backends.Query]) -> list[backends.CommandOutcome] | str:
    """What the backend says became of each command, in order, or why it cannot say (it offers no
    queries, the query failed, or a bug answered the wrong number)."""
    if not isinstance(backend, backends.OutcomeQueries):
        return f"{backend.name if backend is not None else 'no backend here'} cannot be asked what became of it"
    try:
        answers = await backend.outcomes(queries)
        if len(answers) != len(queries):
            raise RuntimeError(f"{backend.name} answered {len(answers)} of {len(queries)} queries")
        return list(answers)
    except Exception as exc:  # a BackendError, or a bug: either way it cannot say now
        log.warning("outcome query failed", extra={"backend": backend.name, "error": repr(exc),
                                                   "command_ids": [q.command_id for q in queries][:20]})
        return f"{backend.name} could not be asked: {exc}"


def _from_finding(outcome: backends.CommandOutcome, backend: str | None) -> Outcome:
    if outcome.finding in (backends.Finding.SUCCEEDED, backends.Finding.FAILED):
        return device_result(outcome.finding is backends.Finding.SUCCEEDED, outcome.message)
    return unconfirmed(f"{backend} says {outcome.finding.value} after the deadline")


def _count_check(check: DeliveryCheckV1, outcome: Outcome) -> None:
    result = NO_CONFIRMATION if outcome.reason == NO_CONFIRMATION else outcome.status.value.lower()
    metrics.CHECKS.labels(result).inc()
    (log.warning if result == NO_CONFIRMATION else log.info)(
        "delivery check", extra={"command_id": check.command_id, "entity_id": check.entity_id, "outcome": outcome.encode()}
    )
