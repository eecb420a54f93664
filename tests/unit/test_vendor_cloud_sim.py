"""The simulator's vendor cloud served for real (its FastAPI app under uvicorn on a free port, in a
thread), with the caller's responseUrl answered by a scripted receiver (httpx.MockTransport
injected into the simulator): what a batch is answered, what devices record, and how results
come back."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY

from dercmd.launcher import free_port
from dercmd.protocols.vendor_cloud import VendorBatchAnswer, VendorResults
from dercmd.settings import Settings
from dercmd.simulator.app import create_app

from ..conftest import wait_for

TOKEN = "sim-test-token"
RESPONSE_URL = "http://dispatch.test/callbacks/vendor-cloud"
FLEET = """
entities:
  ev-1: {kind: EV, vendor: tesla, backend: vendor-cloud}
  pv-1: {kind: PV, vendor: fronius, backend: vendor-cloud, vendorDeviceId: FRO-0001}
  pv-2: {kind: PV, vendor: sma, backend: sunspec-modbus}
"""


@dataclass
class Receiver:
    """The caller's responseUrl: records every POST of results and answers ``status``."""

    status: int = 200
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    taken: list[dict[str, Any]] = field(default_factory=list)  # the bodies answered 2xx

    def handle(self, request: httpx.Request) -> httpx.Response:
        VendorResults.model_validate_json(request.content)  # the protocol's shape, or the POST fails
        self.posts.append((str(request.url), json.loads(request.content)))
        if self.status < 300:
            self.taken.append(json.loads(request.content))
        return httpx.Response(self.status, json={})

    def results(self) -> list[dict[str, Any]]:
        return [result for _, body in self.posts for result in body["results"]]


@dataclass
class Simulator:
    http: httpx.Client
    receiver: Receiver

    def batch(self, commands: list[dict[str, Any]], token: str = TOKEN, url: str = RESPONSE_URL) -> httpx.Response:
        return self.http.post(
            "/vendor-cloud/v1/commands:batch",
            json={"responseUrl": url, "commands": commands},
            headers={"Authorization": f"Bearer {token}"},
        )

    def received(self, entity_id: str) -> list[dict[str, Any]]:
        return self.http.get(f"/sim/devices/{entity_id}/received").json()["commands"]


@pytest.fixture
def simulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    monkeypatch.setenv("DERCMD_VENDOR_CLOUD_TOKEN", TOKEN)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    receiver = Receiver()
    settings = Settings(fleet_file=str(fleet), sim_confirm_delay_ms=5)
    app = create_app(settings, callback_transport=httpx.MockTransport(receiver.handle))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="simulator", daemon=True)
    thread.start()
    wait_for(lambda: server.started, deadline_s=10, what="the simulator to listen")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield Simulator(http, receiver)
    server.should_exit = True
    thread.join(timeout=10)


def command(device_id: str, command_id: str, type: str = "StartCharging", **extra: Any) -> dict[str, Any]:
    return {"deviceId": device_id, "commandId": command_id, "type": type, "responseToken": f"token-{command_id}", **extra}


def callback_errors() -> float:
    return REGISTRY.get_sample_value("dercmd_simulator_callback_errors_total") or 0.0


def test_a_batch_is_answered_per_item_recorded_once_and_reported_with_its_tokens(simulator: Simulator) -> None:
    answer = simulator.batch([
        command("ev-1", "c1"),
        command("ghost", "c2"),
        command("pv-2", "c3"),  # a device of another backend is unknown to this vendor
        command("FRO-0001", "c4", "LimitFeedIn", value=3000),
    ])

    assert answer.status_code == 200, answer.text
    VendorBatchAnswer.model_validate_json(answer.content)
    results = answer.json()["results"]
    assert [(r["commandId"], r["status"]) for r in results] == [("c1", 202), ("c2", 404), ("c3", 404), ("c4", 202)]
    request_ids = {r["commandId"]: r["requestId"] for r in results if r["status"] == 202}
    assert len(set(request_ids.values())) == 2
    assert "ghost" in results[1]["message"] and "requestId" not in results[1]

    wait_for(lambda: len(simulator.receiver.results()) >= 2, deadline_s=10, what="the results of c1 and c4")
    assert [url for url, _ in simulator.receiver.posts] == [RESPONSE_URL]  # one batch, due together: one POST
    assert sorted(simulator.receiver.results(), key=lambda r: r["commandId"]) == [
        {"requestId": request_ids["c1"], "commandId": "c1", "deviceId": "ev-1", "result": "SUCCEEDED", "responseToken": "token-c1"},
        {"requestId": request_ids["c4"], "commandId": "c4", "deviceId": "FRO-0001", "result": "SUCCEEDED", "responseToken": "token-c4"},
    ]
    assert [(c["commandId"], c["type"], c["value"]) for c in simulator.received("ev-1")] == [("c1", "StartCharging", None)]
    assert [(c["commandId"], c["type"], c["value"]) for c in simulator.received("pv-1")] == [("c4", "LimitFeedIn", 3000)]
    assert simulator.received("pv-2") == [] and simulator.received("ghost") == []


def test_results_due_together_come_in_posts_of_at_most_500_per_response_url(simulator: Simulator) -> None:
    first = simulator.batch([command("ev-1", f"a{i}") for i in range(1000)], url=f"{RESPONSE_URL}/a")
    second = simulator.batch([command("ev-1", f"b{i}") for i in range(10)], url=f"{RESPONSE_URL}/b")
    assert first.status_code == second.status_code == 200

    wait_for(lambda: len(simulator.receiver.results()) >= 1010, deadline_s=10, what="1010 results")
    sizes = sorted((url.rsplit("/", 1)[1], len(body["results"])) for url, body in simulator.receiver.posts)
    assert sizes == [("a", 500), ("a", 500), ("b", 10)]
    assert sorted(r["commandId"] for r in simulator.receiver.results()) == sorted(
        [f"a{i}" for i in range(1000)] + [f"b{i}" for i in range(10)]
    )
    assert len(simulator.received("ev-1")) == 1010


def test_a_refused_post_of_results_is_retried_with_backoff_until_the_receiver_is_back(simulator: Simulator) -> None:
    """As webhook senders do: a receiver down for a while (dispatch restarting) gets every
    result once it is back, nothing counted lost."""
    simulator.receiver.status = 503
    before = callback_errors()
    assert simulator.batch([command("ev-1", "c1"), command("ev-1", "c2")]).status_code == 200
    wait_for(lambda: len(simulator.receiver.posts) >= 3, deadline_s=10, what="three tries")
    simulator.receiver.status = 200
    wait_for(lambda: simulator.receiver.taken, deadline_s=15, what="the results once the receiver is back")
    assert sorted(r["commandId"] for r in simulator.receiver.taken[0]["results"]) == ["c1", "c2"]
    assert callback_errors() == before
    assert all(body == simulator.receiver.posts[0][1] for _, body in simulator.receiver.posts)  # the same results each time


def test_a_post_of_results_refused_past_every_retry_is_counted_lost(simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from dercmd.simulator.backends import vendor_cloud

    monkeypatch.setattr(vendor_cloud, "RETRY_DELAYS_S", (0.01, 0.01))
    simulator.receiver.status = 503
    before = callback_errors()
    assert simulator.batch([command("ev-1", "c1"), command("ev-1", "c2")]).status_code == 200
    wait_for(lambda: callback_errors() - before == 2, deadline_s=10, what="two lost results counted")
    assert len(simulator.receiver.posts) == 3  # the first try and one per retry, nothing more


def test_a_wrong_token_is_401_and_nothing_is_recorded(simulator: Simulator) -> None:
    answer = simulator.batch([command("ev-1", "c1")], token="wrong")
    assert answer.status_code == 401
    assert simulator.received("ev-1") == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"responseUrl": "http://x", "commands": []}', b'{"commands": [{"deviceId": "ev-1"}]}'],
    ids=["not-json", "no-commands", "incomplete"],
)
def test_a_malformed_batch_is_400(simulator: Simulator, body: bytes) -> None:
    answer = simulator.http.post(
        "/vendor-cloud/v1/commands:batch", content=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 400 and "malformed" in answer.json()["message"]
    assert simulator.received("ev-1") == []


def test_results_held_back_are_pending_then_reported_when_released(simulator: Simulator) -> None:
    """``PUT /sim/vendor-cloud/faults``: held results are PENDING to ``commands:status`` and
    reported at once when released."""
    held = simulator.http.put("/sim/vendor-cloud/faults", json={"holdResults": True})
    assert held.json() == {"holdResults": True, "loseResults": False}
    assert simulator.batch([command("ev-1", "h1")]).status_code == 200
    status = simulator.http.post("/vendor-cloud/v1/commands:status", json={"commandIds": ["h1", "never"]},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert status.json() == {"results": [{"commandId": "h1", "status": "PENDING"}, {"commandId": "never", "status": "UNKNOWN"}]}
    assert simulator.receiver.results() == []
    released = simulator.http.put("/sim/vendor-cloud/faults", json={"holdResults": False})
    assert released.json() == {"holdResults": False, "loseResults": False}
    wait_for(lambda: len(simulator.receiver.results()) == 1, deadline_s=10, what="the released result")
    assert simulator.receiver.results()[0]["commandId"] == "h1"
