"""What the status service's sweeper hands on for each open command it finds in the ledger."""

from datetime import UTC, datetime, timedelta

from dercmd.events import CommandAcceptedV1, CommandCancelV1, CommandStateV1, CommandStatus, CommandType, DeliveryCheckV1
from dercmd.settings import Settings
from dercmd.status.sweeper import LedgerMark, Sweeper

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SETTINGS = Settings(recover_after_s=20, deadline_pending_s=60, deadline_triggered_s=60)


def state(status: CommandStatus, age_s: float, **fields: object) -> CommandStateV1:
    at = NOW - timedelta(seconds=age_s)
    base: dict[str, object] = dict(id="c1", entity_id="ev-1", status=status, type=CommandType.START_CHARGING, created_at=at,
                                   updated_at=at, accepted_at=at, trigger_time=at, source="rest")
    if status is not CommandStatus.PENDING:
        base |= {"triggered_at": at}
    return CommandStateV1(**(base | fields))  # type: ignore[arg-type]


def handed_on(s: CommandStateV1) -> object:
    sweeper = Sweeper(SETTINGS, None, None, None, None)  # type: ignore[arg-type]  # _request touches none of them
    record = sweeper._request(s, NOW)
    return record[1] if record else None


def test_an_immediate_command_stuck_pending_is_announced_again_as_it_was_accepted() -> None:
    event = handed_on(state(CommandStatus.PENDING, 30, value=None))
    assert isinstance(event, CommandAcceptedV1)
    assert (event.id, event.entity_id, event.type, event.trigger_time, event.source) == ("c1", "ev-1", CommandType.START_CHARGING, None, "rest")
    assert event.recovered  # so dispatch asks the backend first if it has no record of it
    assert event.accepted_at == NOW - timedelta(seconds=30)


def test_a_triggered_window_is_announced_again_with_its_window() -> None:
    start, end = NOW - timedelta(seconds=25), NOW + timedelta(minutes=5)
    s = state(CommandStatus.TRIGGERED, 25, type=CommandType.LIMIT_PRODUCTION_POWER, percentage=40, trigger_time=start,
              end_at=end, accepted_at=start - timedelta(seconds=60))
    event = handed_on(s)
    assert isinstance(event, CommandAcceptedV1)
    assert (event.trigger_time, event.end_at, event.percentage) == (start, end, 40)


def test_past_its_stage_deadline_or_expires_at_a_command_is_expired_not_announced() -> None:
    assert isinstance(handed_on(state(CommandStatus.PENDING, 61)), CommandCancelV1)
    caller = handed_on(state(CommandStatus.TRIGGERED, 21, expires_at=NOW - timedelta(seconds=1)))
    assert isinstance(caller, CommandCancelV1) and caller.include_scheduled


def test_a_revert_or_a_command_waiting_for_its_cooldown_is_left_to_its_deadline() -> None:
    assert handed_on(state(CommandStatus.TRIGGERED, 30, revert_of="w1")) is None
    assert handed_on(state(CommandStatus.PENDING, 30, cooldown_until=NOW + timedelta(minutes=3))) is None


def test_a_sent_command_without_a_result_is_checked_with_dispatch() -> None:
    assert isinstance(handed_on(state(CommandStatus.SENT, 200, sent_at=NOW - timedelta(seconds=200))), DeliveryCheckV1)


def at(s: float) -> datetime:
    return NOW + timedelta(seconds=s)


def test_the_ledger_is_judged_only_as_of_a_moment_whose_status_events_it_all_holds() -> None:
    mark = LedgerMark()
    assert mark.step(None, at(0)) is None  # partitions not known yet
    assert mark.step(({0: 0, 1: 0}, {0: 100, 1: 50}), at(1)) is None  # first look: ends noted at 1 s
    assert mark.step(({0: 100, 1: 49}, {0: 180, 1: 90}), at(2)) is None  # partition 1 not there yet
    assert mark.step(({0: 120, 1: 50}, {0: 200, 1: 120}), at(3)) == at(1)  # everything before 1 s is in
    # A ledger far behind (a restarted status service) is not swept...
    assert mark.step(({0: 150, 1: 60}, {0: 300, 1: 200}), at(4)) is None
    # ...until it reaches the ends noted at 3 s; then it is judged as of 3 s, not now.
    assert mark.step(({0: 200, 1: 120}, {0: 400, 1: 300}), at(9)) == at(3)


def test_an_idle_topic_is_swept_every_round_after_the_first() -> None:
    mark = LedgerMark()
    assert mark.step(({0: 7}, {0: 7}), at(0)) is None
    assert mark.step(({0: 7}, {0: 7}), at(1)) == at(0)
    assert mark.step(({0: 7}, {0: 7}), at(2)) == at(1)


def test_a_broker_that_came_back_empty_starts_the_mark_again() -> None:
    mark = LedgerMark()
    mark.step(({0: 0}, {0: 500}), at(0))
    assert mark.step(({0: 0}, {0: 3}), at(1)) is None  # the log is shorter than noted: noted again
    assert mark.step(({0: 3}, {0: 10}), at(2)) == at(1)
