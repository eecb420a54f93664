"""The batch handler of ``dercmd.commands.requests``: the Kafka way in, with REST's validation.

A request that cannot be admitted becomes a ``Rejected`` status event (when an id and entity
can be read from it) and a dead-letter record; the records beside it are admitted as usual.
Offsets are committed after each batch is handled (:mod:`dercmd.consumer`), so a crash
redelivers, and a redelivered request maps to the same command id (see
:class:`~dercmd.events.CommandRequestV1`), which every step downstream deduplicates.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRecord

from dercmd import topics
from dercmd.consumer import Item
from dercmd.events import ID_PATTERN, CommandAcceptedV1, CommandRequestV1, CommandStatus, Event, StatusEventV1, utcnow
from dercmd.kafka import clip, header, loads, partition_of

from . import metrics
from . import commands
from .admission import Admission, Refusal

log = logging.getLogger(__name__)

#: As long as a request's entityId may be (CommandRequestV1).
_MAX_ENTITY_ID: int = next(m.max_length for m in CommandRequestV1.model_fields["entity_id"].metadata if hasattr(m, "max_length"))

#: A Rejected status says at most this much of why (a refusal may quote the request).
_MAX_DETAIL = 2_000

_POSITION_NAMESPACE = uuid.UUID("6f1c7d5e-8f0b-4a35-9a7e-2f9f0e3c1b11")


def command_id_of(record: ConsumerRecord, body_id: str | None) -> str:
    """The request's own id, else its CloudEvents id (a UUID derived from it if it is not a
    valid command id), else one derived from the record's position."""
    if body_id:
        return body_id
    ce_id = header(record.headers, "ce_id")
    if ce_id:
        return ce_id if re.fullmatch(ID_PATTERN, ce_id) else str(uuid.uuid5(_POSITION_NAMESPACE, ce_id))
    return str(uuid.uuid5(_POSITION_NAMESPACE, f"{record.topic}/{record.partition}/{record.offset}"))


class RequestsHandler:
    """Admits each batch of requests; what cannot be admitted is said ``Rejected`` and
    dead-lettered, and never holds up the good requests beside it."""

    def __init__(self, admission: Admission, *, refuse_misrouted: bool = False) -> None:
        self._admission = admission
        self._refuse_misrouted = refuse_misrouted
        #: How many partitions the requests topic has (set once its consumer runs).
        self.partitions: Callable[[], int | None] = lambda: None

    def _misrouted(self, record: ConsumerRecord, count: int | None) -> Refusal | None:
        """A request on another partition than its key's murmur2 partition (a producer with
        another partitioner, e.g. librdkafka's default consistent_random): counted and logged,
        and refused where ``DERCMD_REQUESTS_MISROUTED=refuse``, since the entity's requests on
        two partitions may be taken in either order."""
        if not count or record.key is None or (expected := partition_of(record.key, count)) == record.partition:
            return None
        metrics.MISROUTED.inc()
        log.warning("request on another partition than its key's", extra={
            "key": clip(record.key, 128), "partition": record.partition, "expected": expected})
        if not self._refuse_misrouted:
            return None
        return Refusal("wrong_partition", f"the record is on partition {record.partition}, its key's murmur2 partition is "
                                          f"{expected}: produce with the murmur2 partitioner (librdkafka: partitioner=murmur2_random)")

    async def __call__(self, items: list[Item[CommandRequestV1]]) -> None:
        admitted: list[tuple[Item[CommandRequestV1], CommandAcceptedV1]] = []
        refused: list[tuple[Item[CommandRequestV1], str, Refusal]] = []
        now = utcnow()
        partitions = self.partitions()  # (the topic's, once a batch)
        for item in items:
            request = item.event
            command_id = command_id_of(item.record, request.id)
            entity = self._admission.fleet.entity(request.entity_id)
            try:
                if item.record.key != request.entity_id.encode():
                    # The key decides the partition, and so the order of the entity's commands.
                    raise Refusal("key_mismatch", f"the record's key must be its entityId {request.entity_id!r}, "
                                                  f"not {clip(item.record.key, 200)}")
                if (misrouted := self._misrouted(item.record, partitions)) is not None:
                    raise misrouted
                if entity is None:
                    raise Refusal("unknown_entity", f"no entity {request.entity_id}")
                cmd = commands.build(
                    self._admission.fleet, entity, request, now=now, source="kafka", command_id=command_id,
                    start_at=request.start_at, end_at=request.end_at, asset_identifiers=request.asset_identifiers,
                    expires_at=request.expires_at, ignore_cooldown=request.ignore_cooldown,
                )
            except Refusal as refusal:
                refused.append((item, command_id, refusal))
                continue
            admitted.append((item, cmd))
        results = await self._admission.admit_many([cmd for _, cmd in admitted]) if admitted else []
        for (item, cmd), result in zip(admitted, results, strict=True):
            if isinstance(result, Refusal):
                refused.append((item, cmd.id, result))
            else:
                log.debug("accepted", extra={"command_id": cmd.id, "entity_id": cmd.entity_id, "type": cmd.type.value, "source": "kafka"})
        if refused:
            await self._reject(
                [(command_id, item.event.entity_id, refusal.key, refusal.message, item.event) for item, command_id, refusal in refused]
            )
            for item, _, refusal in refused:
                record = item.record
                await self._admission.publisher.dead_letter(
                    topics.REQUESTS, key=record.key, value=record.value, headers=record.headers,
                    error=f"{refusal.key}: {refusal.message}", partition=record.partition, offset=record.offset,
                )

    async def on_invalid(self, record: ConsumerRecord, error: Exception) -> None:
        """Say ``Rejected`` for a request that did not parse (it is dead-lettered already), if
        it names an entity: ``identifier_too_long`` for an ``entityId`` longer than any entity's
        (the status names it by its first characters and ``…``), else ``invalid_request``."""
        body: Any = loads(record.value)  # never raises: None for what is too large, deep or not JSON
        body = body if isinstance(body, dict) else {}
        entity_id = body.get("entityId")
        key, message = "invalid_request", str(error)
        if isinstance(entity_id, str) and len(entity_id) > _MAX_ENTITY_ID:
            key, message = "identifier_too_long", f"entityId is longer than {_MAX_ENTITY_ID} characters ({len(entity_id)})"
            entity_id = entity_id[:_MAX_ENTITY_ID - 1] + "…"  # as long as an entity id may be, and no entity's
        if not isinstance(entity_id, str) or not entity_id:
            metrics.REFUSED.labels("kafka", "unreadable").inc()
            return  # nothing to attach a status to: the dead letter is all there is
        body_id = body.get("id") if isinstance(body.get("id"), str) and re.fullmatch(ID_PATTERN, body["id"]) else None
        await self._reject([(command_id_of(record, body_id), entity_id, key, message, None)])

    async def _reject(self, rejections: list[tuple[str, str, str, str, CommandRequestV1 | None]]) -> None:
        known = await self._admission.known([command_id for command_id, *_ in rejections])
        events: list[tuple[topics.Topic, Event, str]] = []
        for command_id, entity_id, key, message, request in rejections:
            metrics.REFUSED.labels("kafka", key).inc()
            if key == "duplicate_id" or command_id in known:
                # The id belongs to a command already in the ledger (this request's earlier
                # delivery, or another command): a Rejected would overwrite its status.
                log.warning("refused, id in use", extra={"command_id": command_id, "key": key, "detail": message[:300]})
                continue
            event = StatusEventV1(
                command_id=command_id,
                entity_id=entity_id,
                status=CommandStatus.REJECTED,
                reason=key,
                detail=message[:_MAX_DETAIL],
                type=request.type if request else None,
                percentage=request.percentage if request else None,
                value=request.value if request else None,
                source="kafka",
            )
            events.append((topics.STATUS, event, entity_id))
            log.warning("rejected", extra={"command_id": command_id, "entity_id": entity_id, "key": key, "detail": message[:300]})
        await self._admission.publisher.publish_all(events)
