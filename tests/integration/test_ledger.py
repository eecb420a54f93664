"""The ledger's monotonic state machine, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from dercmd.events import CommandAcceptedV1, CommandStatus as S, CommandType, StatusEventV1
from dercmd.ledger import Ledger

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def ledger(ledger_url: str):  # type: ignore[no-untyped-def]
    ledger = Ledger(ledger_url)
    ledger.create_schema()
    yield ledger
    ledger.close()


def accepted() -> CommandAcceptedV1:
    return CommandAcceptedV1(id=str(uuid.uuid4()), entity_id="ev-1", type=CommandType.START_CHARGING, accepted_at=T0, source="rest")


def event(cmd: CommandAcceptedV1, status: S, seconds: float, **kw: object) -> StatusEventV1:
    return StatusEventV1(command_id=cmd.id, entity_id=cmd.entity_id, status=status, at=T0 + timedelta(seconds=seconds), **kw)


def test_pending_row_then_forward_transitions_with_stage_times(ledger: Ledger) -> None:
    cmd = accepted()
    assert ledger.record_pending(cmd) is True
    assert ledger.record_pending(cmd) is False
    applied = ledger.apply([event(cmd, s, i) for i, s in enumerate([S.PENDING, S.TRIGGERED, S.SENT, S.SUCCEEDED])])
    assert [a.changed for a in applied] == [True, True, True, True]
    state = ledger.get(cmd.id)
    assert state is not None and state.status is S.SUCCEEDED
    assert (state.accepted_at, state.triggered_at, state.sent_at, state.confirmed_at) == tuple(T0 + timedelta(seconds=i) for i in range(4))
    assert [h["status"] for h in ledger.history(cmd.id)] == ["Pending", "Triggered", "Sent", "Succeeded"]


def test_late_and_duplicate_events_never_move_a_command_backwards(ledger: Ledger) -> None:
    cmd = accepted()
    ledger.record_pending(cmd)
    ledger.apply([event(cmd, S.SUCCEEDED, 3)])
    late = ledger.apply([event(cmd, S.SENT, 2), event(cmd, S.TRIGGERED, 1), event(cmd, S.SUCCEEDED, 3)])
    assert [a.changed for a in late] == [False, False, False]
    assert [a.current for a in late] == [False, False, True]  # the repeat of the winner is current
    assert ledger.get(cmd.id).status is S.SUCCEEDED  # type: ignore[union-attr]


def test_a_terminal_status_is_final(ledger: Ledger) -> None:
    cmd = accepted()
    ledger.record_pending(cmd)
    ledger.apply([event(cmd, S.SUCCEEDED, 1)])
    (after,) = ledger.apply([event(cmd, S.CANCELED, 2, reason="superseded", superseded_by="x")])
    assert not after.changed
    assert after.state.status is S.SUCCEEDED and after.state.superseded_by is None


def test_an_event_for_an_unknown_command_creates_it(ledger: Ledger) -> None:
    (applied,) = ledger.apply([StatusEventV1(command_id="rej-" + uuid.uuid4().hex, entity_id="ev-9", status=S.REJECTED,
                                             reason="invalid_request", at=T0, source="kafka")])
    assert applied.changed and applied.state.status is S.REJECTED and applied.state.reason == "invalid_request"


def test_times_come_back_timezone_aware(ledger: Ledger) -> None:
    cmd = accepted()
    ledger.record_pending(cmd)
    state = ledger.get(cmd.id)
    assert state is not None and state.accepted_at == T0 and state.accepted_at.tzinfo is not None


def test_list_filters_and_pages_newest_first(ledger: Ledger) -> None:
    entity = f"ev-{uuid.uuid4().hex[:8]}"
    ids = []
    for minute in range(5):
        cmd = CommandAcceptedV1(id=str(uuid.uuid4()), entity_id=entity, type=CommandType.START_CHARGING,
                                accepted_at=T0 + timedelta(minutes=minute), source="rest")
        ledger.record_pending(cmd)
        ids.append(cmd.id)
    ledger.apply([StatusEventV1(command_id=ids[1], entity_id=entity, status=S.FAILED, at=T0 + timedelta(hours=1))])
    assert [c.id for c in ledger.list(entity)] == ids[::-1]
    assert [c.id for c in ledger.list(entity, offset=1, limit=2)] == [ids[3], ids[2]]
    assert [c.id for c in ledger.list(entity, since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))] == [ids[2], ids[1]]
    assert [c.id for c in ledger.list(entity, status=S.FAILED)] == [ids[1]]


def test_schema_creation_is_safe_when_processes_race_on_a_new_database(ledger_url: str, postgres_url: str) -> None:
    import sqlalchemy
    from concurrent.futures import ThreadPoolExecutor

    if ledger_url.startswith("postgresql"):
        # a database of its own, so the tables really are new
        admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        name = f"race_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        ledger_url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    ledgers = [Ledger(ledger_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(ledgers)) as pool:
            list(pool.map(lambda l: l.create_schema(), ledgers))  # raises if any lost the race
        assert ledgers[0].get("nothing") is None
    finally:
        for ledger in ledgers:
            ledger.close()
        if ledger_url.startswith("postgresql"):
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()


def test_rejected_never_moves_a_command_that_exists(ledger: Ledger) -> None:
    cmd = accepted()
    ledger.record_pending(cmd)
    ledger.apply([event(cmd, S.SENT, 1)])
    (applied,) = ledger.apply([event(cmd, S.REJECTED, 2, reason="invalid_request")])
    assert not applied.changed and applied.state.status is S.SENT
