"""The durable command history (SQLAlchemy; SQLite by default, PostgreSQL in production).

Two writers, one rule. intake inserts a command's row as ``Pending`` before it answers the
caller; the status service folds status events into rows. Every change goes through
:meth:`Ledger.apply`, which records each event once (its id is the primary key of
``command_events``) and moves a command only to a higher rank of
:class:`~dercmd.events.CommandStatus`: a late or duplicate event never moves it backwards,
and a terminal status is final. ``Rejected`` means "never accepted": it may create a
command, never move one that exists. Methods are synchronous; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy.exc
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.types import TypeDecorator

from .events import CommandAcceptedV1, CommandStateV1, CommandStatus, StatusEventV1


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


metadata = MetaData()

#: pg_advisory_xact_lock key held while the schema is created ("dercmd" in ASCII).
_SCHEMA_LOCK_KEY = 0x646572636D64

commands = Table(
    "commands",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("entity_id", String(128), nullable=False),
    Column("type", String(32)),
    Column("value", BigInteger),
    Column("status", String(16), nullable=False),
    Column("reason", String(64)),
    Column("detail", Text),
    Column("trigger_time", UTCDateTime),
    Column("ignore_cooldown", Boolean, nullable=False, default=False),
    Column("source", String(16)),
    Column("cooldown_until", UTCDateTime),
    Column("superseded_by", String(64)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # One timestamp per stage (BRIEF 6): accepted, dispatched, backend-accepted, confirmed.
    Column("accepted_at", UTCDateTime),
    Column("triggered_at", UTCDateTime),
    Column("sent_at", UTCDateTime),
    Column("confirmed_at", UTCDateTime),
    Index("ix_commands_entity_created", "entity_id", "created_at"),
)

# The audit trail: every status event once, in arrival order per command.
command_events = Table(
    "command_events",
    metadata,
    Column("event_id", String(100), primary_key=True),
    Column("command_id", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("reason", String(64)),
    Column("detail", Text),
    Column("source", String(16)),
)

_STAGE_COLUMN = {
    CommandStatus.TRIGGERED: "triggered_at",
    CommandStatus.SENT: "sent_at",
    CommandStatus.SUCCEEDED: "confirmed_at",
    CommandStatus.FAILED: "confirmed_at",
    CommandStatus.CANCELED: "confirmed_at",
    CommandStatus.REJECTED: "confirmed_at",
}


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of folding one event: the command's state after it; ``current`` when the
    command is in the event's status (the event won or repeats the winner); ``changed`` when
    it is also the first time this event was seen."""

    state: CommandStateV1
    current: bool
    changed: bool


def create_ledger_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets intake and status write from separate processes without blocking readers.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _insert_ignoring_conflicts(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT that does nothing when the primary key exists; True if a row was inserted."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    key = next(iter(table.primary_key.columns))
    result = conn.execute(insert(table).values(**values).on_conflict_do_nothing().returning(key))
    return result.first() is not None


def _state(row: Any) -> CommandStateV1:
    return CommandStateV1.model_validate(
        {
            "id": row.id,
            "entity_id": row.entity_id,
            "status": row.status,
            "type": row.type,
            "value": row.value,
            "trigger_time": row.trigger_time,
            "reason": row.reason,
            "detail": row.detail,
            "cooldown_until": row.cooldown_until,
            "superseded_by": row.superseded_by,
            "source": row.source,
            "ignore_cooldown": row.ignore_cooldown,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "accepted_at": row.accepted_at,
            "triggered_at": row.triggered_at,
            "sent_at": row.sent_at,
            "confirmed_at": row.confirmed_at,
        }
    )


class Ledger:
    def __init__(self, url: str) -> None:
        self.engine = create_ledger_engine(url)

    def create_schema(self) -> None:
        """Create missing tables. Safe when several processes start at once on a new database
        (intake and status do, and so do replicas): PostgreSQL serialises them with an
        advisory lock; on SQLite a loser of the race finds the tables on its second look."""
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                    metadata.create_all(conn)
                return
            except sqlalchemy.exc.OperationalError as exc:
                if "already exists" not in str(exc) or attempt == 2:
                    raise

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def record_pending(self, cmd: CommandAcceptedV1) -> bool:
        """Insert the command as Pending; False (and no change) if it already exists. Its
        history starts when the status service folds the matching Pending event."""
        with self.engine.begin() as conn:
            return _insert_ignoring_conflicts(
                conn,
                commands,
                {
                    "id": cmd.id,
                    "entity_id": cmd.entity_id,
                    "type": cmd.type.value,
                    "value": cmd.value,
                    "status": CommandStatus.PENDING.value,
                    "trigger_time": cmd.trigger_time or cmd.accepted_at,
                    "ignore_cooldown": cmd.ignore_cooldown,
                    "source": cmd.source,
                    "created_at": cmd.accepted_at,
                    "updated_at": cmd.accepted_at,
                    "accepted_at": cmd.accepted_at,
                },
            )

    def record_pending_many(self, cmds: Sequence[CommandAcceptedV1]) -> set[str]:
        return {c.id for c in cmds if self.record_pending(c)}

    def get_many(self, ids: Sequence[str]) -> dict[str, CommandStateV1]:
        return {i: s for i in ids if (s := self.get(i)) is not None}

    def apply(self, events: Iterable[StatusEventV1]) -> list[Applied]:
        """Fold status events in one transaction (see the module docstring for the rules)."""
        out: list[Applied] = []
        with self.engine.begin() as conn:
            for ev in events:
                fresh = _insert_ignoring_conflicts(
                    conn,
                    command_events,
                    {"event_id": ev.event_id, "command_id": ev.command_id, "status": ev.status.value,
                     "at": ev.at, "reason": ev.reason, "detail": ev.detail, "source": ev.source},
                )
                by_id = commands.c.id == ev.command_id
                row = conn.execute(select(commands).where(by_id)).first()
                if row is None:
                    self._insert_from_event(conn, ev)
                    row = conn.execute(select(commands).where(by_id)).one()
                elif fresh and ev.status is not CommandStatus.REJECTED and ev.status.rank > CommandStatus(row.status).rank:
                    row = conn.execute(update(commands).where(by_id).values(**self._changes(ev)).returning(*commands.c)).one()
                # "current" includes the Pending that intake wrote before announcing it, and a
                # redelivered event whose state may not have been published the first time.
                current = row.status == ev.status.value
                out.append(Applied(_state(row), current=current, changed=fresh and current))
        return out

    @staticmethod
    def _changes(ev: StatusEventV1) -> dict[str, Any]:
        changes: dict[str, Any] = {"status": ev.status.value, "updated_at": ev.at}
        for field in ("reason", "detail", "cooldown_until", "superseded_by"):
            if getattr(ev, field) is not None:
                changes[field] = getattr(ev, field)
        if ev.status in _STAGE_COLUMN:
            changes[_STAGE_COLUMN[ev.status]] = ev.at
        return changes

    def _insert_from_event(self, conn: Connection, ev: StatusEventV1) -> None:
        # A command the ledger has not seen: a Rejected request, or a row lost with a database.
        _insert_ignoring_conflicts(
            conn,
            commands,
            {
                "id": ev.command_id,
                "entity_id": ev.entity_id,
                "type": ev.type.value if ev.type else None,
                "value": ev.value,
                "trigger_time": ev.trigger_time,
                "source": ev.source,
                "ignore_cooldown": False,
                "created_at": ev.at,
                "accepted_at": ev.at if ev.status is CommandStatus.PENDING else None,
                **self._changes(ev),
            },
        )

    def get(self, command_id: str) -> CommandStateV1 | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(commands).where(commands.c.id == command_id)).first()
        return _state(row) if row else None

    def list(
        self,
        entity_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: CommandStatus | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> list[CommandStateV1]:
        """An entity's commands, newest first, created in [since, until)."""
        query = select(commands).where(commands.c.entity_id == entity_id)
        if since is not None:
            query = query.where(commands.c.created_at >= since)
        if until is not None:
            query = query.where(commands.c.created_at < until)
        if status is not None:
            query = query.where(commands.c.status == status.value)
        query = query.order_by(commands.c.created_at.desc(), commands.c.id).offset(offset).limit(limit)
        with self.engine.connect() as conn:
            return [_state(row) for row in conn.execute(query)]

    def history(self, command_id: str) -> Sequence[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(command_events).where(command_events.c.command_id == command_id).order_by(command_events.c.at)
            ).all()
        return [dict(r._mapping) for r in rows]
