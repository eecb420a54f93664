"""The consumer of ``dercmd.commands.requests``: the Kafka way in, with REST's validation.

A request that cannot be admitted becomes a ``Rejected`` status event (when an id and entity
can be read from it) and, if it cannot even be parsed, a dead-letter record; the records
behind it are processed as usual. Offsets are committed after each batch is handled, so a
crash redelivers, and a redelivered request maps to the same command id (see
:class:`~dercmd.events.CommandRequestV1`), which every step downstream deduplicates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from dercmd import topics
from dercmd.events import ID_PATTERN, CommandAcceptedV1, CommandRequestV1, CommandStatus, StatusEventV1, utcnow
from dercmd.kafka import consumer_kwargs, header
from dercmd.settings import Settings
from dercmd.streams import guarded_record

from . import metrics
from .admission import Admission, Refusal

log = logging.getLogger(__name__)

GROUP_ID = "dercmd-intake"
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


class RequestsConsumer:
    def __init__(self, settings: Settings, admission: Admission) -> None:
        self._settings = settings
        self._admission = admission
        self._consumer = AIOKafkaConsumer(topics.REQUESTS.name, **consumer_kwargs(settings, GROUP_ID))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="requests-consumer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._consumer.stop()

    @property
    def partitions(self) -> int:
        return len(self._consumer.assignment())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=1000, max_records=500)
                for records in batches.values():
                    for record in records:
                        await self._process(record)
                if batches:
                    await self._consumer.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Whatever failed (a commit after a rebalance, a dead letter that could not be
                # written), the uncommitted records come again; the consumer must live on.
                log.exception("requests consumer error; resuming from the last commit")
                await asyncio.sleep(1.0)
                await self._rewind()

    async def _rewind(self) -> None:
        """Go back to the committed offsets, so records fetched but not handled come again."""
        for tp in self._consumer.assignment():
            committed = await self._consumer.committed(tp)
            if committed is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, committed)

    async def _process(self, record: ConsumerRecord) -> None:
        async def on_invalid(value: bytes | None, error: Exception) -> None:
            await self._reject_unparsed(record, value, error)

        async def handle(request: CommandRequestV1) -> None:
            await self._handle(record, request)

        await guarded_record(
            self._admission.publisher,
            topics.REQUESTS,
            key=record.key,
            value=record.value,
            headers=record.headers,
            partition=record.partition,
            offset=record.offset,
            handle=handle,
            on_invalid=on_invalid,
        )

    async def _handle(self, record: ConsumerRecord, request: CommandRequestV1) -> None:
        command_id = command_id_of(record, request.id)
        entity = self._admission.fleet.entity(request.entity_id)
        cmd = CommandAcceptedV1(
            id=command_id,
            entity_id=request.entity_id,
            type=request.type,
            value=request.value,
            ignore_cooldown=request.ignore_cooldown,
            accepted_at=utcnow(),
            source="kafka",
        )
        try:
            if entity is None:
                raise Refusal("unknown_entity", f"no entity {request.entity_id}")
            self._admission.check(entity, request)
            await self._admission.admit(cmd)
        except Refusal as refusal:
            await self._reject(command_id, request.entity_id, refusal.key, refusal.message, request)
            await self._admission.publisher.dead_letter(
                topics.REQUESTS, key=record.key, value=record.value, headers=record.headers,
                error=f"{refusal.key}: {refusal.message}", partition=record.partition, offset=record.offset,
            )
            return
        log.info("accepted", extra={"command_id": cmd.id, "entity_id": cmd.entity_id, "type": cmd.type.value, "source": "kafka"})

    async def _reject_unparsed(self, record: ConsumerRecord, value: bytes | None, error: Exception) -> None:
        """Say ``Rejected`` for a request that did not parse, if it names an entity."""
        try:
            body: Any = json.loads(value or b"")
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        entity_id = body.get("entityId") if isinstance(body.get("entityId"), str) else None
        if not entity_id:
            metrics.REFUSED.labels("kafka", "unreadable").inc()
            return  # nothing to attach a status to: the dead letter is all there is
        body_id = body.get("id") if isinstance(body.get("id"), str) and re.fullmatch(ID_PATTERN, body["id"]) else None
        await self._reject(command_id_of(record, body_id), entity_id, "invalid_request", str(error)[:2000], None)

    async def _reject(self, command_id: str, entity_id: str, key: str, message: str, request: CommandRequestV1 | None) -> None:
        metrics.REFUSED.labels("kafka", key).inc()
        if key == "duplicate_id" or await self._admission.known(command_id):
            # The id belongs to a command already in the ledger (this request's earlier
            # delivery, or another command): a Rejected would overwrite its status.
            log.warning("refused, id in use", extra={"command_id": command_id, "key": key, "detail": message[:300]})
            return
        event = StatusEventV1(
            command_id=command_id,
            entity_id=entity_id,
            status=CommandStatus.REJECTED,
            reason=key,
            detail=message,
            type=request.type if request else None,
            value=request.value if request else None,
            source="kafka",
        )
        await self._admission.publisher.publish(topics.STATUS, event, entity_id)
        log.warning("rejected", extra={"command_id": command_id, "entity_id": entity_id, "key": key, "detail": message[:300]})
