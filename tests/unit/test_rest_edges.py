"""REST edges (issue 18): an identifier longer than any can be is refused first with a stable
key, and DELETE agrees with GET about a command whose entity is not in the fleet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dercmd import web
from dercmd.events import CommandStatus, StatusEventV1
from dercmd.fleet import Fleet
from dercmd.intake.context import MAX_COMMAND_ID, MAX_ENTITY_ID, Intake
from dercmd.intake.routes import batch_commands, entity_commands, queries
from dercmd.ledger import Ledger

FLEET = Fleet.load(Path(__file__).parents[2] / "deploy" / "fleet.example.yaml")
CONTRIBUTOR = {"Authorization": "Bearer dev-contributor"}
VIEWER = {"Authorization": "Bearer dev-viewer"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Ledger]]:
    ledger = Ledger(f"sqlite:///{tmp_path}/l.sqlite3")
    ledger.create_schema()
    app = FastAPI()
    web.install_error_envelope(app)
    # Neither admission nor idempotency is reached by what these tests send.
    intake = Intake(FLEET, None, ledger, None)  # type: ignore[arg-type]
    for module in (entity_commands, batch_commands, queries):
        app.include_router(module.router(intake))
    with TestClient(app) as client:
        yield client, ledger
    ledger.close()


LONG_ENTITY = "e" * (MAX_ENTITY_ID + 1)
LONG_COMMAND = "c" * (MAX_COMMAND_ID + 1)


@pytest.mark.parametrize(("method", "path", "name"), [
    ("POST", f"/v1/entities/{LONG_ENTITY}/commands", "entityId"),
    ("POST", f"/v1/entities/{LONG_ENTITY}/commands/schedule", "entityId"),
    ("GET", f"/v1/entities/{LONG_ENTITY}/commands", "entityId"),
    ("GET", f"/v1/entities/{'e' * 60_000}/commands", "entityId"),
    ("GET", f"/v1/commands/{LONG_COMMAND}", "id"),
    ("DELETE", f"/v1/commands/{LONG_COMMAND}", "id"),
])
@pytest.mark.parametrize("headers", [CONTRIBUTOR, {}], ids=["token", "no token"])
def test_an_identifier_too_long_is_refused_first(client: tuple[TestClient, Ledger], method: str, path: str, name: str,
                                                 headers: dict[str, str]) -> None:
    """Before the token, the body or any lookup: it says nothing of what exists."""
    answer = client[0].request(method, path, headers=headers, content=b"not json")
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["key"] == "identifier_too_long"
    assert body["errors"] == [{"loc": ["path", name], "msg": f"at most {MAX_COMMAND_ID if name == 'id' else MAX_ENTITY_ID} characters"}]
    assert len(answer.content) < 400  # the identifier is not echoed


def test_identifiers_at_the_limit_go_on_as_before(client: tuple[TestClient, Ledger]) -> None:
    answer = client[0].get(f"/v1/entities/{'e' * MAX_ENTITY_ID}/commands", headers=CONTRIBUTOR)
    assert (answer.status_code, answer.json()["key"]) == (404, "entity_not_found")
    answer = client[0].get(f"/v1/commands/{'c' * MAX_COMMAND_ID}", headers=CONTRIBUTOR)
    assert (answer.status_code, answer.json()["key"]) == (404, "command_not_found")


def test_delete_agrees_with_get_on_a_rejected_command_of_an_unknown_entity(client: tuple[TestClient, Ledger]) -> None:
    http, ledger = client
    ledger.apply([StatusEventV1(command_id="k-1", entity_id="no-such-entity", status=CommandStatus.REJECTED,
                                reason="unknown_entity", detail="no entity no-such-entity", source="kafka")])
    assert http.get("/v1/commands/k-1", headers=CONTRIBUTOR).json()["status"] == "Rejected"
    answer = http.delete("/v1/commands/k-1", headers=CONTRIBUTOR)
    assert (answer.status_code, answer.json()["key"], answer.json()["status"]) == (409, "command_finished", "Rejected")
    answer = http.delete("/v1/commands/k-1", headers=VIEWER)  # may read it, may not cancel it
    assert (answer.status_code, answer.json()["key"]) == (403, "forbidden")
    partner = http.delete("/v1/commands/k-1", headers={"Authorization": "Bearer dev-partner"})  # may not see it
    assert (partner.status_code, partner.json()["key"]) == (404, "command_not_found")
    assert http.get("/v1/commands/k-1", headers={"Authorization": "Bearer dev-partner"}).status_code == 404
