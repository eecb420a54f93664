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

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy.exc
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    JSON,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    and_,
    inspect,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.types import TypeDecorator

from .events import CommandAcceptedV1, CommandStateV1, CommandStatus, StatusEventV1


class _SQLiteDateTime(sqlite.DATETIME):
    """SQLite's DATETIME, stored as SQLAlchemy stores it ("2026-11-22 15:00:00.123456", UTC),
    written by ``isoformat`` in C instead of a Python format per value: binding times was the
    largest single cost of intake's ledger inserts. Read back aware."""

    def bind_processor(self, dialect: Any) -> Any:
        def process(value: datetime | None) -> str | None:
            # UTC already (UTCDateTime.process_bind_param): the first 26 characters leave out
            # the "+00:00" of an aware time.
            return None if value is None else value.isoformat(" ", "microseconds")[:26]

        return process

    def result_processor(self, dialect: Any, coltype: object) -> Any:
        parse = datetime.fromisoformat

        def process(value: str | None) -> datetime | None:
            return None if value is None else parse(value).replace(tzinfo=UTC)

        return process


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        return _SQLiteDateTime() if dialect.name == "sqlite" else super().load_dialect_impl(dialect)

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
    Column("percentage", Integer),
    Column("status", String(16), nullable=False),
    Column("reason", String(64)),
    Column("detail", Text),
    Column("trigger_time", UTCDateTime),
    Column("end_at", UTCDateTime),
    Column("asset_identifiers", JSON),
    Column("expires_at", UTCDateTime),
    Column("revert_of", String(64)),
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
    # The sweeper's question: which commands are open, oldest change first.
    Index("ix_commands_status_updated", "status", "updated_at"),
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

#: What folding an event may change in a command's row (``Ledger._changes``).
_MOVABLE = ("status", "updated_at", "reason", "detail", "cooldown_until", "superseded_by", *dict.fromkeys(_STAGE_COLUMN.values()))
_UPDATE_MOVED = update(commands).where(commands.c.id == bindparam("_id")).values({c: bindparam(c) for c in _MOVABLE})
#: What a Rejected row held that a command taking its id must not inherit.
_CLEARED = ("reason", "detail", "cooldown_until", "superseded_by", "revert_of", "triggered_at", "sent_at", "confirmed_at")
#: The state's fields the ledger keeps (the others, such as a window's startAt, the model derives).
_STATE_FIELDS = tuple(name for name in CommandStateV1.model_fields if name in commands.c)
#: Events folded, or ids read, per statement: an ``IN (...)`` of this many ids stays within
#: SQLite's bound-parameter limit (999 before 3.32); inserts are paged by SQLAlchemy.
_CHUNK = 900


class Applied:
    """The outcome of folding one event: the command's state after it; ``current`` when the
    command is in the event's status (the event won or repeats the winner); ``changed`` when
    it is also the first time this event was seen.

    ``state`` is built when first asked for: a consumer of a batch usually needs it only for
    the last event of each command, and building a model per event was most of a fold."""

    __slots__ = ("_row", "_state", "current", "changed", "foreign")

    def __init__(self, row: Mapping[str, Any], current: bool, changed: bool, state: CommandStateV1 | None = None,
                 foreign: bool = False) -> None:
        self._row = row
        self._state = state
        self.current = current
        self.changed = changed
        #: The event names another entity than its command's: refused, not recorded.
        self.foreign = foreign

    @property
    def state(self) -> CommandStateV1:
        if self._state is None:
            self._state = _state(self._row)
        return self._state

    @property
    def accepted_at(self) -> datetime | None:
        return _utc(self._row["accepted_at"])


def create_ledger_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            # WAL lets intake and status write from separate processes without blocking readers.
            # Switching a new file to it takes a lock that SQLite does not wait for (no busy
            # handler): services starting together on a new ledger try again.
            for attempt in range(300):
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 299:
                        raise
                    time.sleep(0.1)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _insert(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def _utc(value: datetime | None) -> datetime | None:
    """A time as the database gives it back: aware UTC (a naive time is taken as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _add_missing_columns(conn: Connection) -> None:
    """Columns added since a ledger was created (all nullable): ``create_all`` makes missing
    tables only. Until the schema needs more than added columns, this is the migration."""
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}'))
        for index in table.indexes:
            index.create(conn, checkfirst=True)


def _state(row: Mapping[str, Any]) -> CommandStateV1:
    return CommandStateV1.model_validate({name: row[name] for name in _STATE_FIELDS})


class _WriteTurns:
    """Whose turn it is to write a SQLite ledger, across processes (intake and status write
    one file) and threads: an exclusive ``flock`` on ``<file>.lock``, held for the whole write
    transaction. SQLite's own busy handler polls for its lock with sleeps of 1, 2, 5, 10, 15,
    20, 25 ... ms, so a short transaction behind a long one waited up to twice as long as it
    had to, and a writer that commits again at once could win over and over; a waiter on a
    ``flock`` is woken by the kernel when it is released. PostgreSQL needs none of this."""

    def __init__(self, path: str) -> None:
        self._path = f"{path}.lock"
        self._thread = threading.Lock()  # a flock is per open file: threads take turns first
        self._fd: int | None = None

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._thread:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Ledger:
    def __init__(self, url: str) -> None:
        self.engine = create_ledger_engine(url)
        self._pending_statement: Any = None
        path = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        self._turns = _WriteTurns(path) if path and path != ":memory:" and not path.startswith("file:") else None

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction, in this writer's turn (SQLite files only)."""
        with self._turns.turn() if self._turns is not None else nullcontext(), self.engine.begin() as conn:
            yield conn

    def create_schema(self) -> None:
        """Create missing tables. Safe when several processes start at once on a new database
        (intake and status do, and so do replicas): PostgreSQL serialises them with an
        advisory lock, SQLite with the writers' turns; a loser of a race that slips past both
        finds the tables on its next look."""
        for attempt in range(3):
            try:
                with self._writing() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                    metadata.create_all(conn)
                    _add_missing_columns(conn)
                return
            except sqlalchemy.exc.OperationalError as exc:
                if "already exists" not in str(exc) or attempt == 2:
                    raise

    def close(self) -> None:
        self.engine.dispose()
        if self._turns is not None:
            self._turns.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def record_pending(self, cmd: CommandAcceptedV1) -> bool:
        """Insert the command as Pending; False (and no change) if it already exists."""
        return cmd.id in self.record_pending_many([cmd])

    def record_pending_many(self, cmds: Sequence[CommandAcceptedV1]) -> set[str]:
        """Insert commands as Pending in one transaction; the ids that were new. A command that
        exists is left as it is, unless it is ``Rejected``: a rejected request holds no id, so
        a command with its id takes its row (and counts as new; the row's history keeps the
        rejection). Its history starts when the status service folds the matching Pending
        event."""
        if not cmds:
            return set()
        rows = [
            {
                "id": cmd.id,
                "entity_id": cmd.entity_id,
                "type": cmd.type.value,
                "value": cmd.value,
                "percentage": cmd.percentage,
                "status": CommandStatus.PENDING.value,
                "trigger_time": cmd.trigger_time or cmd.accepted_at,
                "end_at": cmd.end_at,
                "asset_identifiers": list(cmd.asset_identifiers) if cmd.asset_identifiers is not None else None,
                "expires_at": cmd.expires_at,
                "ignore_cooldown": cmd.ignore_cooldown,
                "source": cmd.source,
                "created_at": cmd.accepted_at,
                "updated_at": cmd.accepted_at,
                "accepted_at": cmd.accepted_at,
            }
            # One row per id: PostgreSQL refuses an upsert that meets one row twice.
            for cmd in {c.id: c for c in reversed(cmds)}.values()
        ]
        with self._writing() as conn:
            return set(conn.execute(self._pending_upsert(conn), rows).scalars())

    def _pending_upsert(self, conn: Connection) -> Any:
        """INSERT Pending rows, or take the row of a Rejected request with that id (every column
        from the new row, those of ``_CLEARED`` emptied); RETURNING the ids written. Built once
        (building its ``excluded`` columns was a third of the cost of intake's ledger write)."""
        if self._pending_statement is None:
            insert = _insert(conn, commands)
            # No bound parameter outside VALUES (NULL and the status as SQL literals): with one,
            # SQLAlchemy sends the rows one statement each instead of one multi-row INSERT.
            taken = {c.name: null() if c.name in _CLEARED else insert.excluded[c.name] for c in commands.columns}
            self._pending_statement = insert.on_conflict_do_update(
                index_elements=[commands.c.id], set_=taken,
                where=commands.c.status == literal_column(f"'{CommandStatus.REJECTED.value}'"),
            ).returning(commands.c.id)
        return self._pending_statement

    def apply(self, events: Iterable[StatusEventV1]) -> list[Applied]:
        """Fold status events, in the order given, in one transaction (see the module docstring
        for the rules); one :class:`Applied` per event, in that order.

        An event sees what the events before it did, in this batch too. Each chunk of
        ``_CHUNK`` events costs a fixed number of statements: insert the events, read their
        commands, insert the commands the ledger lacks, update the commands that moved.
        """
        events = list(events)
        folded: list[tuple[dict[str, Any], bool, bool, bool]] = []
        with self._writing() as conn:
            for chunk in _chunks(events):
                folded += self._fold(conn, chunk)
        return [Applied(row, current=current, changed=changed, foreign=foreign) for row, current, changed, foreign in folded]

    def _fold(self, conn: Connection, events: Sequence[StatusEventV1]) -> list[tuple[dict[str, Any], bool, bool, bool]]:
        rows = self._rows(conn, list(dict.fromkeys(ev.command_id for ev in events)))
        # A command the ledger has not seen (a Rejected request, or a row lost with a database)
        # is created from its first event.
        missing = {ev.command_id: self._row_from_event(ev) for ev in reversed(events) if ev.command_id not in rows}
        if missing:
            created = self._insert_new(conn, commands, list(missing.values()))
            rows.update({cid: missing[cid] for cid in created})
            # Not created: another writer (intake) inserted it since we looked; fold onto that.
            rows.update(self._rows(conn, [cid for cid in missing if cid not in created]))
        # An event that names another entity than its command's row is refused, and not
        # recorded: a result is about one command of one entity (a forged or mistaken one must
        # not end another's). Each other event is recorded once: only the first copy of a newly
        # inserted id is fresh.
        unseen = self._insert_new(conn, command_events, [self._event_row(ev) for ev in events
                                                          if rows[ev.command_id]["entity_id"] == ev.entity_id])
        moved: set[str] = set()
        out = []
        for ev in events:
            row = rows[ev.command_id]
            if row["entity_id"] != ev.entity_id:  # foreign: refused
                out.append((row, False, False, True))
                continue
            fresh = ev.event_id in unseen
            unseen.discard(ev.event_id)
            if fresh and ev.status is not CommandStatus.REJECTED and ev.status.rank > CommandStatus(row["status"]).rank:
                # A new dict, so the states returned for earlier events stay as they were.
                row = rows[ev.command_id] = {**row, **self._changes(ev)}
                moved.add(ev.command_id)
            # "current" includes the Pending that intake wrote before announcing it, and a
            # redelivered event whose state may not have been published the first time.
            current = row["status"] == ev.status.value
            out.append((row, current, fresh and current, False))
        if moved:
            conn.execute(_UPDATE_MOVED, [{"_id": cid, **{c: rows[cid][c] for c in _MOVABLE}} for cid in moved])
        return out

    @staticmethod
    def _insert_new(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> set[str]:
        """INSERT rows, skipping those whose primary key exists; the keys inserted. One
        executemany (SQLAlchemy packs it into multi-row INSERTs within the parameter limit)."""
        if not rows:
            return set()
        key = next(iter(table.primary_key.columns))
        return set(conn.execute(_insert(conn, table).on_conflict_do_nothing().returning(key), rows).scalars())

    @staticmethod
    def _rows(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Command rows by id, locked until the transaction ends on PostgreSQL (SQLite already
        holds the database's write lock once the events were inserted), so no other writer
        moves them between this read and the update."""
        rows: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(ids):
            query = select(commands).where(commands.c.id.in_(chunk)).order_by(commands.c.id).with_for_update()
            rows.update((row.id, dict(row._mapping)) for row in conn.execute(query))
        return rows

    @staticmethod
    def _event_row(ev: StatusEventV1) -> dict[str, Any]:
        return {"event_id": ev.event_id, "command_id": ev.command_id, "status": ev.status.value,
                "at": ev.at, "reason": ev.reason, "detail": ev.detail, "source": ev.source}

    @staticmethod
    def _changes(ev: StatusEventV1) -> dict[str, Any]:
        # Times as the database returns them, since folded rows are returned without a re-read.
        at = _utc(ev.at)
        changes: dict[str, Any] = {"status": ev.status.value, "updated_at": at}
        for field in ("reason", "detail", "superseded_by"):
            if getattr(ev, field) is not None:
                changes[field] = getattr(ev, field)
        if ev.cooldown_until is not None:
            changes["cooldown_until"] = _utc(ev.cooldown_until)
        if ev.status in _STAGE_COLUMN:
            changes[_STAGE_COLUMN[ev.status]] = at
        return changes

    def _row_from_event(self, ev: StatusEventV1) -> dict[str, Any]:
        at = _utc(ev.at)
        return {
            **dict.fromkeys(commands.c.keys()),
            "id": ev.command_id,
            "entity_id": ev.entity_id,
            "type": ev.type.value if ev.type else None,
            "value": ev.value,
            "percentage": ev.percentage,
            "trigger_time": _utc(ev.trigger_time),
            "end_at": _utc(ev.end_at),
            "asset_identifiers": list(ev.asset_identifiers) if ev.asset_identifiers is not None else None,
            "expires_at": _utc(ev.expires_at),
            "revert_of": ev.revert_of,
            "source": ev.source,
            "ignore_cooldown": False,
            "created_at": at,
            "accepted_at": at if ev.status is CommandStatus.PENDING else None,
            **self._changes(ev),
        }

    def get_many(self, command_ids: Iterable[str]) -> dict[str, CommandStateV1]:
        """The states of those commands that exist, by id."""
        ids = list(dict.fromkeys(command_ids))
        with self.engine.connect() as conn:
            rows = {}
            for chunk in _chunks(ids):
                rows.update((row.id, row) for row in conn.execute(select(commands).where(commands.c.id.in_(chunk))))
        return {cid: _state(row._mapping) for cid, row in rows.items()}

    def get(self, command_id: str) -> CommandStateV1 | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(commands).where(commands.c.id == command_id)).first()
        return _state(row._mapping) if row else None

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
            return [_state(row._mapping) for row in conn.execute(query)]

    def overdue(self, now: datetime, *, pending_s: float, triggered_s: float, sent_s: float, limit: int) -> list[CommandStateV1]:
        """Open commands past a deadline, oldest change first: Pending longer than
        ``pending_s`` after their start, Triggered longer than ``triggered_s``, Sent longer
        than ``sent_s``, and Pending or Triggered past the caller's ``expiresAt``."""
        c = commands.c
        pending, triggered, sent = CommandStatus.PENDING.value, CommandStatus.TRIGGERED.value, CommandStatus.SENT.value
        query = (
            select(commands)
            .where(
                or_(
                    and_(c.status == pending, c.trigger_time < now - timedelta(seconds=pending_s)),
                    and_(c.status == triggered, c.triggered_at < now - timedelta(seconds=triggered_s)),
                    and_(c.status == sent, c.sent_at < now - timedelta(seconds=sent_s)),
                    and_(c.status.in_((pending, triggered)), c.expires_at < now),
                )
            )
            .order_by(c.updated_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_state(row._mapping) for row in conn.execute(query)]

    def expiring(self, until: datetime, *, limit: int) -> list[CommandStateV1]:
        """Open commands not yet delivered (Pending or Triggered) whose caller's ``expiresAt``
        comes before ``until``, soonest first."""
        c = commands.c
        query = (
            select(commands)
            .where(c.status.in_((CommandStatus.PENDING.value, CommandStatus.TRIGGERED.value)), c.expires_at < until)
            .order_by(c.expires_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_state(row._mapping) for row in conn.execute(query)]

    def history(self, command_id: str) -> Sequence[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(command_events).where(command_events.c.command_id == command_id).order_by(command_events.c.at)
            ).all()
        return [dict(r._mapping) for r in rows]
