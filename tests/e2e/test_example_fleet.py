"""Every entity of the example fleet (`make run`'s) takes every type it supports to Succeeded
over its own protocol: the vendor cloud, a native-window device, SunSpec Modbus TCP, OCPP 1.6J
and the EV aggregator, each device receiving each command once."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dercmd.events import CommandType
from dercmd.fleet import Fleet
from dercmd.launcher import Stack

from .conftest import FLEET, Api, running_stack

pytestmark = pytest.mark.e2e

BODIES: dict[CommandType, dict[str, Any]] = {
    CommandType.LIMIT_FEED_IN: {"value": 2000},
    CommandType.LIMIT_PRODUCTION_POWER: {"percentage": 50},
}


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(request, tmp_path_factory, cooldown_s="0")


def test_every_entity_takes_every_type_it_supports_to_succeeded_over_its_own_protocol(api: Api) -> None:
    fleet = Fleet.load(FLEET)
    plan = {e.id: [t for t in CommandType if fleet.supports(e, t)] for e in fleet.entities.values()}
    assert {fleet.entities[e].backend for e, types in plan.items() if types} == {
        "vendor-cloud", "native-window", "sunspec-modbus", "ocpp", "ev-aggregator"}

    def run(entity_id: str) -> list[tuple[str, str, str | None]]:
        """One entity's types in turn (a charge point starts before it stops): each must end
        before the next is sent, or the next would supersede it."""
        out = []
        for command_type in plan[entity_id]:
            posted = api.post(entity_id, {"type": command_type.value, **BODIES.get(command_type, {})})
            assert posted.status_code == 201, (entity_id, command_type, posted.text)
            ended = api.wait_terminal(posted.json()["id"], deadline_s=60)
            out.append((command_type.value, ended["status"], ended.get("reason")))
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(plan, pool.map(run, plan), strict=True))
    failures = {e: [r for r in rs if r[1] != "Succeeded"] for e, rs in results.items()}
    assert {e: f for e, f in failures.items() if f} == {}
    for entity_id, types in plan.items():
        received = [c["type"] for c in api.received(entity_id)]
        assert received == [t.value for t in types], entity_id
