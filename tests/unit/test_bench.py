"""The benchmark's pure parts: the generated fleet loads, pacing adds up, percentiles by rank.
(The bench measures; nothing here asserts on timing.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from dercmd.bench import fleetgen, http1
from dercmd.bench.load import paced, request_record
from dercmd.bench.report import percentile
from dercmd.events import CommandRequestV1, CommandType
from dercmd.fleet import Fleet, Role


def test_generated_fleet_loads_and_every_entity_can_start_charging(tmp_path: Path) -> None:
    ids = fleetgen.write(tmp_path / "fleet.yaml", 50)
    fleet = Fleet.load(tmp_path / "fleet.yaml")
    assert list(fleet.entities) == ids
    assert {e.backend for e in fleet.entities.values()} == {"vendor-cloud"}
    assert sum(e.kind == "EV" for e in fleet.entities.values()) == 45
    assert all(fleet.supports(e, CommandType.START_CHARGING) for e in fleet.entities.values())
    assert fleet.role(fleetgen.TOKEN, ids[-1]) is Role.CONTRIBUTOR
    assert Fleet.model_validate(fleetgen.fleet(50)).entities == fleet.entities


def test_request_record_is_a_valid_request_keyed_by_entity() -> None:
    key, value, headers = request_record("c-1", "ev-000001")
    request = CommandRequestV1.model_validate_json(value)
    assert (key, request.id, request.entity_id) == (b"ev-000001", "c-1", "ev-000001")
    assert dict(headers)["ce_type"] == b"dercmd.command.request.v1"


def test_paced_sends_rate_times_step_each_step() -> None:
    steps = list(paced(1000, 1000, 0.01))
    assert len(steps) == 100 and {n for _, n in steps} == {10}
    assert steps[-1][0] == 0.99
    slow = list(paced(5, 100, 0.01))  # one per step
    assert [n for _, n in slow] == [1] * 5
    assert sum(n for _, n in paced(7, 3.3, 0.01)) == 7


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([], 50) is None


def test_a_mixed_fleet_puts_each_share_on_its_backend_and_each_entity_supports_what_it_is_sent(tmp_path: Path) -> None:
    mix = fleetgen.parse_mix("ocpp=5,sunspec-modbus=4,ev-aggregator=3,native-window=2")
    ids = fleetgen.write(tmp_path / "fleet.yaml", 50, mix=mix)
    fleet = Fleet.load(tmp_path / "fleet.yaml")
    backends = [fleet.entities[i].backend for i in ids]
    assert {name: backends.count(name) for name in mix} == mix and backends.count("vendor-cloud") == 36
    assert all(fleet.supports(fleet.entities[i], CommandType(fleetgen.command_type(i))) for i in ids)


async def test_the_load_client_keeps_connections_alive_and_opens_a_closed_one_anew() -> None:
    """A real socket server: answers each POST with its body and the connection's number, and
    closes the connection after its second answer (as a server closes an idle one)."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
            body = await reader.readexactly(length)
            answer = json.dumps({"connection": number, "echo": json.loads(body)}).encode()
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = http1.Client(f"http://127.0.0.1:{port}", concurrency=1, headers={"Authorization": "Bearer t"})
    try:
        answers = []
        for i in range(3):
            status, body, _ = await client.post_json("/x", json.dumps({"i": i}).encode(), timeout_s=5)
            answers.append((status, json.loads(body)))
            await asyncio.sleep(0.05)  # the server's close reaches the client between requests
        assert answers == [(201, {"connection": 1, "echo": {"i": 0}}), (201, {"connection": 1, "echo": {"i": 1}}),
                           (201, {"connection": 2, "echo": {"i": 2}})]
    finally:
        client.close()
        server.close()
        await server.wait_closed()
