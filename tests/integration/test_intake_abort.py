"""A command intake could not announce is aborted before it is reported Failed, unless
arbitration already has it (then it is live after all)."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis.asyncio as aioredis

from dercmd.arbitration.arbiter import Arbiter, emissions
from dercmd.events import CommandAcceptedV1, CommandStatus, CommandType, utcnow
from dercmd.fleet import Fleet
from dercmd.intake.admission import Admission
from dercmd.kafka import Publisher
from dercmd.ledger import Ledger
from dercmd.settings import Settings

FLEET = Fleet.load(Path(__file__).parents[2] / "deploy" / "fleet.example.yaml")


def accepted() -> CommandAcceptedV1:
    return CommandAcceptedV1(id=str(uuid.uuid4()), entity_id="ev-1", type=CommandType.START_CHARGING,
                             accepted_at=utcnow(), source="rest")


async def test_abort_wins_only_before_arbitration_decides(redis_url: str, tmp_path: Path, kafka_bootstrap: str) -> None:
    client = aioredis.from_url(redis_url)
    ledger = Ledger(f"sqlite:///{tmp_path}/l.sqlite3")
    ledger.create_schema()
    publisher = Publisher(Settings(kafka_bootstrap=kafka_bootstrap), source="/test")
    admission = Admission(FLEET, ledger, publisher, client)
    arbiter = Arbiter(client, FLEET, 600)

    lost = accepted()
    ledger.record_pending(lost)
    assert await admission.abort(lost, "broker down") is True
    assert ledger.get(lost.id).status is CommandStatus.FAILED  # type: ignore[union-attr]
    late = await arbiter.decide(lost)  # the accepted event turns up after all
    assert late.outcome == "aborted" and emissions(lost, late, utcnow()) == ([], [])

    live = accepted()
    ledger.record_pending(live)
    assert (await arbiter.decide(live)).outcome == "activated"
    assert await admission.abort(live, "timeout") is False
    assert ledger.get(live.id).status is CommandStatus.PENDING  # type: ignore[union-attr]

    await publisher.stop()
    await client.aclose()
    ledger.close()
