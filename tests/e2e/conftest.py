"""The whole stack, started by the launcher `make run` uses, on free ports; once per ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from dercmd.launcher import Stack, isolated_env

from ..conftest import redis_db_url, wait_for

FLEET = Path(__file__).parents[2] / "deploy" / "fleet.example.yaml"
TERMINAL = {"Succeeded", "Failed", "Canceled", "Rejected"}


def running_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fleet_file: Path = FLEET,
                  **settings: str) -> Iterator[Stack]:
    """The whole stack on the ledger ``request.param`` names (sqlite or postgresql)."""
    work = tmp_path_factory.mktemp(f"stack-{request.param}")
    database_url = (
        f"sqlite:///{work}/ledger.sqlite3" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    redis_url = redis_db_url(13)
    try:
        redis.Redis.from_url(redis_url).flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {redis_url}: {exc!r}")
    env = isolated_env(redis_url=redis_url, database_url=database_url, fleet_file=fleet_file, log_level="INFO", **settings)
    with Stack(env=env, log_dir=work / "logs") as running:
        yield running


def inverters_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ids: list[str],
                    **settings: str) -> Iterator[Stack]:
    """The whole stack on a fleet of ``ids`` (SMA inverters on the vendor cloud, no cooldown)
    and the example fleet's contributor token."""
    fleet = {"entities": {e: {"kind": "PV", "vendor": "sma", "backend": "vendor-cloud"} for e in ids},
             "cooldowns": {"PV": 0}, "tokens": {"dev-contributor": [{"entities": "*", "role": "Contributor"}]}}
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    yield from running_stack(request, tmp_path_factory, fleet_file=path, **settings)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(request, tmp_path_factory)


class Api:
    def __init__(self, stack: Stack) -> None:
        self.http = httpx.Client(base_url=stack.url("intake"), timeout=10)
        self.sim = httpx.Client(base_url=stack.url("simulator"), timeout=10)

    def post(self, entity_id: str, body: dict[str, Any], token: str | None = "dev-contributor", **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.post(f"/v1/entities/{entity_id}/commands", json=body, headers=headers, params=params)

    def batch(self, body: dict[str, Any], token: str = "dev-contributor") -> httpx.Response:
        return self.http.post("/v1/command/", json=body, headers={"Authorization": f"Bearer {token}"})

    def schedule(self, entity_id: str, items: list[dict[str, Any]], token: str = "dev-contributor") -> httpx.Response:
        return self.http.post(f"/v1/entities/{entity_id}/commands/schedule", json=items, headers={"Authorization": f"Bearer {token}"})

    def delete(self, command_id: str, token: str = "dev-contributor") -> httpx.Response:
        return self.http.delete(f"/v1/commands/{command_id}", headers={"Authorization": f"Bearer {token}"})

    def get(self, command_id: str, token: str = "dev-contributor") -> httpx.Response:
        return self.http.get(f"/v1/commands/{command_id}", headers={"Authorization": f"Bearer {token}"})

    def wait_terminal(self, command_id: str, deadline_s: float = 30) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            r = self.get(command_id)
            return r.json() if r.status_code == 200 and r.json()["status"] in TERMINAL else None

        return wait_for(probe, deadline_s=deadline_s, what=f"command {command_id} to end")

    def received(self, entity_id: str) -> list[dict[str, Any]]:
        return self.sim.get(f"/sim/devices/{entity_id}/received").json()["commands"]


@pytest.fixture(scope="module")
def api(stack: Stack) -> Api:
    return Api(stack)


class Kafka:
    """Produce requests and read topics on the stack's broker, the way a user's client would."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def produce(self, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
        async def go() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
            await producer.start()
            try:
                for key, value, headers in records:
                    await producer.send_and_wait(topic, value, key=key, headers=headers)
            finally:
                await producer.stop()

        asyncio.run(go())

    def read_until(
        self, topic: str, done: Callable[[list[ConsumerRecord]], bool], deadline_s: float = 30
    ) -> list[ConsumerRecord]:
        """Read ``topic`` from its start until ``done(records)``; fail after the deadline."""

        async def go() -> list[ConsumerRecord]:
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                        enable_auto_commit=False, group_id=None)
            await consumer.start()
            records: list[ConsumerRecord] = []
            try:
                loop = asyncio.get_running_loop()
                end = loop.time() + deadline_s
                while not done(records):
                    if loop.time() > end:
                        raise AssertionError(f"timed out after {deadline_s:.0f} s reading {topic}; read {len(records)} records")
                    for batch in (await consumer.getmany(timeout_ms=200)).values():
                        records.extend(batch)
            finally:
                await consumer.stop()
            return records

        return asyncio.run(go())

    def statuses(self, command_id: str, until: str) -> list[str]:
        """The statuses the status topic carried for one command, in topic order, once ``until`` is among them."""

        def of(records: list[ConsumerRecord]) -> list[str]:
            events = (json.loads(r.value) for r in records)
            return [e["status"] for e in events if e["commandId"] == command_id]

        return of(self.read_until("dercmd.commands.status", lambda rs: until in of(rs)))


@pytest.fixture(scope="module")
def kafka(stack: Stack) -> Kafka:
    return Kafka(stack.settings.kafka_bootstrap)
