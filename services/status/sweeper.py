"""Deadlines, so that no command stays open for good (a lost record, a callback that never
came, a service down at the wrong moment).

Every ``DERCMD_SWEEP_INTERVAL_S`` the sweeper asks the ledger for open commands past a stage
deadline or the caller's ``expiresAt`` and hands each to the service that owns its state,
through the same topics as everything else:

- Pending or Triggered (not delivered): a ``CommandCancelV1`` with reason ``expired`` to
  arbitration, which ends it ``Failed: expired`` only if dispatch has not claimed it (the
  fence makes any order still on its way stale). A scheduled command waiting for its start or
  a cooldown is left alone unless its ``expiresAt`` passed.
- Sent without a result: a ``DeliveryCheckV1`` to dispatch, which asks the backend for the
  outcome where it can, else ends it ``Failed: no_confirmation``; through its delivery state,
  so a late callback cannot add a second terminal status.

Each decision is atomic in Redis where it is taken, so replicas of the status service could
all sweep safely; a Redis lease (``dercmd:sweeper``) still lets one sweep at a time, to
spare the work. A command asked about is asked again only after ``REASK_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timedelta

import redis.asyncio as aioredis

from dercmd import redis_keys, topics
from dercmd.consumer import retrying
from dercmd.events import CommandCancelV1, CommandStateV1, CommandStatus, DeliveryCheckV1, Event, utcnow
from dercmd.kafka import Publisher
from dercmd.ledger import Ledger
from dercmd.settings import Settings

from . import metrics

log = logging.getLogger(__name__)

LEASE_KEY = "dercmd:sweeper"
REASK_S = 30.0
BATCH = 1000


class Sweeper:
    def __init__(self, settings: Settings, ledger: Ledger, publisher: Publisher, redis: aioredis.Redis) -> None:
        self._settings = settings
        self._ledger = ledger
        self._publisher = publisher
        self._redis = redis
        self._me = uuid.uuid4().hex
        self._asked: dict[str, float] = {}  # command id -> monotonic time it was last asked about

    async def run(self) -> None:
        """Sweep every ``DERCMD_SWEEP_INTERVAL_S`` while this replica holds the lease."""
        interval = self._settings.sweep_interval_s
        while True:
            try:
                if await self._lease(interval):
                    await retrying(self.sweep, "sweeper")
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: try again next round
                log.exception("sweep failed")
            await asyncio.sleep(interval)

    async def _lease(self, interval: float) -> bool:
        """Hold the sweeper's lease for the next few rounds (or keep holding it)."""
        ttl_ms = int(interval * 3000)
        async with asyncio.timeout(redis_keys.CALL_TIMEOUT_S):
            if await self._redis.set(LEASE_KEY, self._me, nx=True, px=ttl_ms):
                return True
            if (await self._redis.get(LEASE_KEY)) == self._me.encode():
                await self._redis.pexpire(LEASE_KEY, ttl_ms)
                return True
        return False

    async def sweep(self) -> int:
        """One round; the number of commands handed on."""
        s = self._settings
        now = utcnow()
        overdue = await asyncio.to_thread(
            self._ledger.overdue, now, pending_s=s.deadline_pending_s, triggered_s=s.deadline_triggered_s,
            sent_s=s.deadline_sent_s, limit=BATCH,
        )
        clock = time.monotonic()
        self._asked = {cid: t for cid, t in self._asked.items() if clock - t < REASK_S}
        records: list[tuple[topics.Topic, Event, str]] = []
        for state in overdue:
            if state.id in self._asked:
                continue
            self._asked[state.id] = clock
            records.append(self._request(state, now))
            metrics.SWEPT.labels(state.status.value).inc()
            log.info("deadline passed", extra={"command_id": state.id, "entity_id": state.entity_id, "status": state.status.value})
        await self._publisher.publish_all(records)
        return len(records)

    def _request(self, state: CommandStateV1, now: datetime) -> tuple[topics.Topic, Event, str]:
        if state.status is CommandStatus.SENT:
            return (topics.ORDERS, DeliveryCheckV1(command_id=state.id, entity_id=state.entity_id, at=now), state.entity_id)
        caller = state.expires_at is not None and state.expires_at <= now
        stage = "Pending" if state.status is CommandStatus.PENDING else "Triggered"
        limit = self._settings.deadline_pending_s if state.status is CommandStatus.PENDING else self._settings.deadline_triggered_s
        detail = ("its expiresAt passed before it was delivered" if caller
                  else f"{stage} for more than {timedelta(seconds=limit)} past its start")
        cancel = CommandCancelV1(command_id=state.id, entity_id=state.entity_id, reason="expired", detail=detail,
                                 include_scheduled=caller, at=now)
        return (topics.ACCEPTED, cancel, state.entity_id)
