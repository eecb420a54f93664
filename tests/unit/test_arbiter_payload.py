from datetime import UTC, datetime

from dercmd.state.slots import Payload
from dercmd.events import CommandAcceptedV1, CommandType


def test_payload_round_trips_with_any_asset_identifier() -> None:
    cmd = CommandAcceptedV1(id="c", entity_id="e", type=CommandType.LIMIT_PRODUCTION_POWER, percentage=0,
                            trigger_time=datetime(2026, 6, 1, tzinfo=UTC), end_at=datetime(2026, 6, 2, tzinfo=UTC),
                            asset_identifiers=("a|b", 'c"d', ""), ignore_cooldown=True,
                            accepted_at=datetime(2026, 5, 1, tzinfo=UTC), source="t")
    payload = Payload.of(cmd)
    assert Payload.decode(payload.encode()) == payload
    assert payload.encode().split("|")[4] == str(payload.end_ms)  # where the script reads the end


def test_payload_keeps_none_apart_from_zero_and_empty() -> None:
    cmd = CommandAcceptedV1(id="c", entity_id="e", type=CommandType.LIMIT_FEED_IN, value=0,
                            accepted_at=datetime(2026, 5, 1, tzinfo=UTC), source="t")
    decoded = Payload.decode(Payload.of(cmd).encode())
    assert (decoded.value, decoded.percentage, decoded.assets, decoded.end_ms) == (0, None, None, None)
