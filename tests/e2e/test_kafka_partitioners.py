"""Requests produced by librdkafka (confluent-kafka), a client nobody here wrote, on the
embedded broker: with its default partitioner (consistent_random) most entities' requests land
on another partition than their key's murmur2 one, which intake counts and (here, with
``DERCMD_REQUESTS_MISROUTED=refuse``) refuses as ``Rejected: wrong_partition``; with
``partitioner=murmur2_random`` (what the docs tell librdkafka users to set) every request is
on its key's partition and accepted."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from dercmd.launcher import Stack

from .conftest import Api, inverters_stack

confluent_kafka = pytest.importorskip("confluent_kafka")

pytestmark = pytest.mark.e2e

PV = [f"pv-k{i:02d}" for i in range(40)]


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from inverters_stack(request, tmp_path_factory, PV, requests_misrouted="refuse", topic_partitions="4")


def _produce(stack: Stack, partitioner: str | None) -> list[str]:
    config = {"bootstrap.servers": stack.settings.kafka_bootstrap, "api.version.request": True}
    if partitioner:
        config["partitioner"] = partitioner
    producer = confluent_kafka.Producer(config)
    ids = []
    for entity in PV:
        command_id = f"rdk-{uuid.uuid4().hex[:12]}"
        ids.append(command_id)
        body = {"id": command_id, "entityId": entity, "type": "LimitFeedIn", "value": 1000}
        producer.produce("dercmd.commands.requests", json.dumps(body).encode(), key=entity.encode())
    assert producer.flush(30) == 0
    return ids


def _misrouted(stack: Stack) -> float:
    text = httpx.get(f"{stack.url('intake')}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("dercmd_intake_requests_misrouted_total"))


def test_librdkafka_with_the_murmur2_partitioner_is_taken_and_with_its_default_refused(api: Api, stack: Stack) -> None:
    before = _misrouted(stack)
    good = _produce(stack, "murmur2_random")
    assert {api.wait_terminal(c)["status"] for c in good} == {"Succeeded"}
    assert _misrouted(stack) == before

    default = _produce(stack, None)  # librdkafka's consistent_random
    ended = {c: api.wait_terminal(c) for c in default}
    refused = [c for c, s in ended.items() if s["status"] == "Rejected"]
    assert {ended[c]["reason"] for c in refused} == {"wrong_partition"}
    assert all(s["status"] == "Succeeded" for c, s in ended.items() if c not in refused)
    assert len(refused) >= len(PV) // 2  # with 4 partitions, about 3 in 4 keys land elsewhere
    assert _misrouted(stack) == before + len(refused)
