"""The ledger's monotonic state machine, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

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


def test_an_event_naming_another_entity_than_its_commands_is_refused(ledger: Ledger) -> None:
    """A result is about one command of one entity: an event for the command under another
    entity (a forged or mistaken webhook) moves nothing and is not in its history."""
    cmd = accepted()
    ledger.record_pending(cmd)
    forged = StatusEventV1(command_id=cmd.id, entity_id="ev-3", status=S.FAILED, at=T0 + timedelta(seconds=1),
                           reason="device_failed")
    [applied] = ledger.apply([forged])
    assert (applied.foreign, applied.changed, applied.current) == (True, False, False)
    assert ledger.get(cmd.id).status is S.PENDING  # type: ignore[union-attr]
    assert [e["status"] for e in ledger.history(cmd.id)] == []
    [genuine] = ledger.apply([event(cmd, S.TRIGGERED, 2)])
    assert genuine.changed and not genuine.foreign


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


# Batches: one apply() holds what a consumer sees at once. Within a batch an event sees
# what the events before it did, exactly as if each had been applied alone.


def test_a_batch_of_several_commands_folds_each_in_order(ledger: Ledger) -> None:
    a, b = accepted(), accepted()
    ledger.record_pending(a)
    stages = [S.PENDING, S.TRIGGERED, S.SENT, S.SUCCEEDED]
    # b's events interleaved with a's, as different stages of different commands arrive together
    batch = [event(a, stages[0], 0), event(a, stages[1], 1), event(b, stages[0], 1), event(a, stages[2], 2),
             event(b, stages[1], 2), event(a, stages[3], 3)]
    applied = ledger.apply(batch)
    assert [(x.state.id, x.state.status, x.current, x.changed) for x in applied] == [
        (a.id, S.PENDING, True, True),
        (a.id, S.TRIGGERED, True, True),
        (b.id, S.PENDING, True, True),  # b had no row: its first event creates it
        (a.id, S.SENT, True, True),
        (b.id, S.TRIGGERED, True, True),
        (a.id, S.SUCCEEDED, True, True),
    ]
    # each event's state is the command as that event left it, not as the batch did
    assert applied[1].state.sent_at is None and applied[3].state.sent_at == T0 + timedelta(seconds=2)
    assert ledger.get_many([a.id, b.id, "nothing"]) == {a.id: applied[5].state, b.id: applied[4].state}
    assert [h["status"] for h in ledger.history(a.id)] == ["Pending", "Triggered", "Sent", "Succeeded"]


def test_a_duplicate_inside_a_batch_is_recorded_once(ledger: Ledger) -> None:
    cmd = accepted()
    ledger.record_pending(cmd)
    applied = ledger.apply([event(cmd, S.TRIGGERED, 1), event(cmd, S.TRIGGERED, 1), event(cmd, S.SENT, 2), event(cmd, S.TRIGGERED, 1)])
    assert [(x.current, x.changed) for x in applied] == [(True, True), (True, False), (True, True), (False, False)]
    assert [h["status"] for h in ledger.history(cmd.id)] == ["Triggered", "Sent"]


def test_out_of_order_events_inside_a_batch_never_move_a_command_backwards(ledger: Ledger) -> None:
    cmd = accepted()
    ledger.record_pending(cmd)
    applied = ledger.apply([event(cmd, S.SENT, 2), event(cmd, S.PENDING, 0), event(cmd, S.TRIGGERED, 1), event(cmd, S.SUCCEEDED, 3)])
    assert [(x.state.status, x.current, x.changed) for x in applied] == [
        (S.SENT, True, True), (S.SENT, False, False), (S.SENT, False, False), (S.SUCCEEDED, True, True)]
    state = ledger.get(cmd.id)
    assert state is not None and state.triggered_at is None and state.sent_at == T0 + timedelta(seconds=2)
    # the late events are still in the audit trail, once each
    assert sorted(h["status"] for h in ledger.history(cmd.id)) == ["Pending", "Sent", "Succeeded", "Triggered"]


def test_rejected_inside_a_batch_never_moves_a_command_that_exists(ledger: Ledger) -> None:
    cmd, unknown = accepted(), accepted()
    ledger.record_pending(cmd)
    applied = ledger.apply([event(cmd, S.TRIGGERED, 1), event(cmd, S.REJECTED, 2, reason="invalid_request"),
                            event(unknown, S.REJECTED, 2, reason="invalid_request"), event(cmd, S.SENT, 3)])
    assert [(x.state.status, x.current, x.changed) for x in applied] == [
        (S.TRIGGERED, True, True), (S.TRIGGERED, False, False), (S.REJECTED, True, True), (S.SENT, True, True)]
    assert applied[3].state.reason is None


def test_an_event_for_an_unknown_command_inside_a_batch_creates_it_once(ledger: Ledger) -> None:
    lost = accepted()  # its Pending row never reached this ledger
    applied = ledger.apply([event(lost, S.SENT, 2, type=CommandType.START_CHARGING, source="kafka"),
                            event(lost, S.TRIGGERED, 1), event(lost, S.SUCCEEDED, 3)])
    assert [(x.state.status, x.current, x.changed) for x in applied] == [
        (S.SENT, True, True), (S.SENT, False, False), (S.SUCCEEDED, True, True)]
    state = ledger.get(lost.id)
    assert state is not None and state.status is S.SUCCEEDED and state.type is CommandType.START_CHARGING
    assert (state.created_at, state.sent_at, state.confirmed_at, state.accepted_at) == (
        T0 + timedelta(seconds=2), T0 + timedelta(seconds=2), T0 + timedelta(seconds=3), None)


def test_record_pending_many_inserts_only_the_new_commands(ledger: Ledger) -> None:
    old, new = accepted(), [accepted() for _ in range(3)]
    ledger.record_pending(old)
    ledger.apply([event(old, S.TRIGGERED, 1)])
    assert ledger.record_pending_many([old, *new, new[0]]) == {c.id for c in new}
    states = ledger.get_many([old.id, *(c.id for c in new)])
    assert states[old.id].status is S.TRIGGERED  # left as it was
    assert all(states[c.id].status is S.PENDING and states[c.id].accepted_at == T0 for c in new)
    assert ledger.record_pending_many([]) == set()


def test_a_batch_larger_than_sqlites_parameter_limit(ledger: Ledger) -> None:
    # 32,766 is SQLite's default limit of bound parameters per statement (since 3.32).
    cmds = [accepted() for _ in range(32_766 // 4 + 10)]
    assert len(ledger.record_pending_many(cmds)) == len(cmds)
    stages = [S.PENDING, S.TRIGGERED, S.SENT, S.SUCCEEDED]
    # stage by stage, so each command's events lie far apart in the batch
    batch = [event(c, s, i) for i, s in enumerate(stages) for c in cmds]
    assert len(batch) > 32_766
    applied = ledger.apply(batch)
    assert all(x.changed for x in applied)
    assert [x.state.status for x in applied[:: len(cmds)]] == stages
    states = ledger.get_many(c.id for c in cmds)
    assert len(states) == len(cmds) and {s.status for s in states.values()} == {S.SUCCEEDED}
    assert all(s.sent_at == T0 + timedelta(seconds=2) for s in states.values())


def test_a_rejected_request_holds_no_id_a_command_takes_its_row(ledger: Ledger) -> None:
    """The rule that makes one command id's outcome independent of the order requests are
    read in: an invalid request's Rejected row yields to a command with its id, whichever came
    first; a command's row never yields."""
    first = accepted()
    ledger.apply([StatusEventV1(command_id=first.id, entity_id="pv-1", status=S.REJECTED, at=T0, reason="invalid_request",
                                detail="value: not an integer")])
    assert ledger.record_pending_many([first, first]) == {first.id}  # twice in one batch: one row
    state = ledger.get(first.id)
    assert state is not None and (state.status, state.entity_id, state.reason, state.detail, state.confirmed_at) == (
        S.PENDING, "ev-1", None, None, None)
    assert [h["status"] for h in ledger.history(first.id)] == ["Rejected"]  # the history keeps the rejection
    other = first.model_copy(update={"entity_id": "ev-2"})
    assert ledger.record_pending_many([other]) == set()
    ledger.apply([StatusEventV1(command_id=first.id, entity_id="pv-1", status=S.REJECTED, at=T0, reason="invalid_request",
                                event_id=f"{first.id}/Rejected/2")])
    state = ledger.get(first.id)
    assert state is not None and (state.status, state.entity_id) == (S.PENDING, "ev-1")



def test_sqlite_keeps_its_stored_time_format(tmp_path: Path) -> None:
    """Times are written as SQLAlchemy's SQLite dialect writes them (UTC, microseconds), so a
    ledger written before reads the same; they are read back aware."""
    ledger = Ledger(f"sqlite:///{tmp_path}/times.sqlite3")
    ledger.create_schema()
    cmd = accepted().model_copy(update={"accepted_at": datetime(2026, 11, 22, 16, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))})
    ledger.record_pending(cmd)
    with ledger.engine.begin() as conn:
        raw = conn.execute(text("SELECT accepted_at FROM commands WHERE id = :id"), {"id": cmd.id}).scalar_one()
        conn.execute(text("UPDATE commands SET expires_at = '2026-11-22 15:00:00.000000' WHERE id = :id"), {"id": cmd.id})
    assert raw == "2026-11-22 14:00:00.000005"
    state = ledger.get(cmd.id)
    ledger.close()
    assert state is not None
    assert state.accepted_at == datetime(2026, 11, 22, 14, 0, 0, 5, tzinfo=UTC)
    assert state.expires_at == datetime(2026, 11, 22, 15, 0, tzinfo=UTC)


def test_sqlite_writers_take_turns_through_the_lock_file(tmp_path: Path) -> None:
    """intake and status write one SQLite file from two processes: a writer waits, woken by
    the kernel, while another holds its turn (not SQLite's sleep-and-poll busy handler)."""
    url = f"sqlite:///{tmp_path}/turns.sqlite3"
    status_side, intake_side = Ledger(url), Ledger(url)  # two ledgers on one file, as two processes
    status_side.create_schema()
    cmd = accepted()
    writer = threading.Thread(target=lambda: intake_side.record_pending_many([cmd]))
    with status_side._writing():  # a write transaction in progress
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive()  # waiting for its turn
        assert status_side.get(cmd.id) is None
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert (state := status_side.get(cmd.id)) is not None and state.status is S.PENDING
    assert (tmp_path / "turns.sqlite3.lock").exists()
    status_side.close()
    intake_side.close()
