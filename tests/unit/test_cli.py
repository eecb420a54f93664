"""The operator CLI's own logic against an in-memory API (httpx.MockTransport): what each
command asks the API, how it cuts batches, reads times, prints errors and computes progress."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from dercmd import launcher
from dercmd.cli import app, inputs, progress

Handler = Callable[[httpx.Request], httpx.Response]
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


class FakeApi:
    """Answers with ``handler`` and keeps every request it got."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


def invoke(handler: Handler, *args: str, env: dict[str, str] | None = None) -> tuple[Any, FakeApi]:
    api = FakeApi(handler)
    result = CliRunner().invoke(app, list(args), obj=httpx.MockTransport(api), env={"COLUMNS": "200", **(env or {})})
    return result, api


def command(id: str = "c-1", status: str = "Pending", **fields: Any) -> dict[str, Any]:
    return {"id": id, "entityId": "ev-1", "status": status, "type": "StartCharging", **fields}


def answer(body: Any, status: int = 200) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def refuse(status: int, key: str, message: str, **extra: Any) -> Handler:
    return answer({"key": key, "message": message, **extra}, status)


def accept_batches(request: httpx.Request) -> httpx.Response:
    """``POST /v1/command/``: a command per device, its id derived from the device's."""
    devices = json.loads(request.content)["deviceHashIds"]
    return httpx.Response(201, json={"commands": [{"deviceHashId": d, "id": f"cmd-{d}"} for d in devices]})


def near(iso: str, expected: datetime) -> bool:
    return abs(datetime.fromisoformat(iso) - expected) < timedelta(seconds=5)


# --- argument -> request -------------------------------------------------------------------

def test_send_posts_the_command_with_query_and_bearer_token() -> None:
    result, api = invoke(answer(command(), 201), "--json", "send", "pv-1", "LimitFeedIn", "--value", "3000",
                         "--ignore-cooldown")
    assert result.exit_code == 0, result.output
    (request,) = api.requests
    assert (request.method, request.url.path) == ("POST", "/v1/entities/pv-1/commands")
    assert request.url.params["ignoreCooldown"] == "true"
    assert request.headers["Authorization"] == "Bearer dev-contributor"
    assert api.bodies() == [{"type": "LimitFeedIn", "value": 3000}]
    assert json.loads(result.stdout) == command()


def test_send_without_options_sends_only_the_type_and_shows_id_and_status() -> None:
    result, api = invoke(answer(command(), 201), "send", "ev-1", "StartCharging")
    assert result.exit_code == 0, result.output
    assert api.bodies() == [{"type": "StartCharging"}] and "ignoreCooldown" not in api.requests[0].url.params
    assert "c-1" in result.stdout and "Pending" in result.stdout


def test_url_and_token_come_from_the_environment_and_ids_are_quoted() -> None:
    result, api = invoke(answer(command()), "show", "a/b?c",
                         env={"DERCMD_API_URL": "http://api.example:9999/", "DERCMD_TOKEN": "t0k"})
    assert result.exit_code == 0, result.output
    (request,) = api.requests
    assert str(request.url) == "http://api.example:9999/v1/commands/a%2Fb%3Fc"
    assert request.headers["Authorization"] == "Bearer t0k"


def test_send_wait_polls_until_terminal_and_exits_by_outcome() -> None:
    states = iter([command(status="Triggered"), command(status="Failed", reason="device_offline")])
    result, api = invoke(lambda r: httpx.Response(201 if r.method == "POST" else 200,
                                                  json=command() if r.method == "POST" else next(states)),
                         "send", "ev-1", "StartCharging", "--wait")
    assert [r.method for r in api.requests] == ["POST", "GET", "GET"]
    assert result.exit_code == 3, result.output
    assert "Failed" in result.stdout and "device_offline" in result.stdout


def test_schedule_posts_a_list_with_relative_trigger_times_resolved(tmp_path: Path) -> None:
    items = tmp_path / "plan.yaml"
    items.write_text("- {triggerTime: +10m, type: StopCharging}\n"
                     "- {triggerTime: 2030-01-01T10:00:00+02:00, type: StartCharging}\n")
    scheduled = {"commands": [command("s-1", triggerTime="x"), command("s-2")]}
    result, api = invoke(answer(scheduled, 201), "schedule", "ev-1", str(items))
    assert result.exit_code == 0, result.output
    assert api.requests[0].url.path == "/v1/entities/ev-1/commands/schedule"
    first, second = api.bodies()[0]
    assert first["type"] == "StopCharging" and near(first["triggerTime"], datetime.now(UTC) + timedelta(minutes=10))
    assert second == {"triggerTime": "2030-01-01T08:00:00.000Z", "type": "StartCharging"}
    assert "s-1" in result.stdout and "s-2" in result.stdout


def test_schedule_takes_inline_json_of_one_item() -> None:
    result, api = invoke(answer({"commands": [command()]}, 201), "--json", "schedule", "pv-1",
                         '{"triggerTime": "+1h", "type": "LimitFeedIn", "value": 0}')
    assert result.exit_code == 0, result.output
    (body,) = api.bodies()
    assert len(body) == 1 and body[0]["value"] == 0
    assert json.loads(result.stdout) == {"commands": [command()]}


def test_batch_cuts_any_number_of_devices_into_requests_of_100(tmp_path: Path) -> None:
    devices = tmp_path / "ids.txt"
    devices.write_text("# the north feeder\n" + "\n".join(f"d{i}" for i in range(250)) + "\n\nd0\n")
    out = tmp_path / "sent.json"
    result, api = invoke(accept_batches, "batch", "--percentage", "30", "--start", "+10s", "--end", "+1h",
                         "--devices", str(devices), "--asset", "inverter-a", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert all(r.method == "POST" and r.url.path == "/v1/command/" for r in api.requests)
    bodies = api.bodies()
    assert [len(b["deviceHashIds"]) for b in bodies] == [100, 100, 50]
    assert [d for b in bodies for d in b["deviceHashIds"]] == [f"d{i}" for i in range(250)]
    command_ = bodies[0]["command"]
    assert all(b["command"] == command_ for b in bodies)
    assert command_["type"] == "limitProductionPower" and command_["percentage"] == 30
    assert command_["assetIdentifiers"] == ["inverter-a"]
    assert near(command_["startAt"], datetime.now(UTC) + timedelta(seconds=10))
    assert near(command_["endAt"], datetime.now(UTC) + timedelta(hours=1))
    assert inputs.read_ids(str(out)) == [f"cmd-d{i}" for i in range(250)]
    assert "250 commands accepted for 250 devices (3 of 3 requests)" in result.stderr


def test_batch_file_holds_a_list_of_requests_each_cut_to_100(tmp_path: Path) -> None:
    file = tmp_path / "batches.yaml"
    file.write_text(
        "- command: {type: limitProductionPower, percentage: 0, startAt: 2030-01-01T10:00:00Z, endAt: +2h}\n"
        f"  deviceHashIds: {json.dumps([f'a{i}' for i in range(120)])}\n"
        "- command: {type: limitProductionPower, percentage: 50,\n"
        "            startAt: '2030-01-01T10:00:00+01:00', endAt: '2030-01-01T12:00:00+01:00'}\n"
        "  deviceHashIds: [b1]\n"
    )
    result, api = invoke(accept_batches, "--json", "batch", str(file))
    assert result.exit_code == 0, result.output
    bodies = api.bodies()
    assert [(b["command"]["percentage"], len(b["deviceHashIds"])) for b in bodies] == [(0, 100), (0, 20), (50, 1)]
    assert bodies[0]["command"]["startAt"] == "2030-01-01T10:00:00.000Z"
    assert bodies[2]["command"]["startAt"] == "2030-01-01T09:00:00.000Z"
    report = json.loads(result.stdout)
    assert len(report["commands"]) == 121 and report["refused"] == []


def test_batch_refused_at_the_first_request_sends_nothing_more(tmp_path: Path) -> None:
    devices = tmp_path / "ids.json"
    devices.write_text(json.dumps([f"d{i}" for i in range(300)]))
    result, api = invoke(refuse(400, "end_at_in_the_past", "endAt 2020-01-01T00:00:00Z is in the past"),
                         "batch", "--percentage", "30", "--end", "2020-01-01T00:00:00Z", "--devices", str(devices))
    assert result.exit_code == 1
    assert len(api.requests) == 1
    assert ("end_at_in_the_past: endAt 2020-01-01T00:00:00Z is in the past "
            "(request 1 of 3; the other 2 were not sent)") in result.stderr
    assert "Traceback" not in result.output


def test_batch_partly_refused_keeps_the_accepted_ids_and_exits_non_zero(tmp_path: Path) -> None:
    devices = tmp_path / "ids.txt"
    devices.write_text("\n".join(["ok"] * 1 + [f"d{i}" for i in range(99)] + ["ghost"] + [f"e{i}" for i in range(10)]))

    def handler(request: httpx.Request) -> httpx.Response:
        if "ghost" in json.loads(request.content)["deviceHashIds"]:
            return httpx.Response(400, json={"key": "unknown_device_hash_id", "message": "no device ghost"})
        return accept_batches(request)

    out = tmp_path / "sent.json"
    result, _ = invoke(handler, "--json", "batch", "--percentage", "30", "--end", "+1h", "--devices", str(devices),
                       "--out", str(out))
    assert result.exit_code == 1
    assert "unknown_device_hash_id: no device ghost (request 2 of 2)" in result.stderr
    report = json.loads(result.stdout)
    assert [r["key"] for r in report["refused"]] == ["unknown_device_hash_id"]
    assert report["refused"][0]["request"] == 2
    assert len(inputs.read_ids(str(out))) == 100


def test_batch_refusals_are_printed_once_per_distinct_error_with_details(tmp_path: Path) -> None:
    devices = tmp_path / "ids.txt"
    devices.write_text("\n".join(f"d{i}" for i in range(1000)))

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["deviceHashIds"][0] in ("d0", "d300"):
            return accept_batches(request)
        return httpx.Response(503, json={"key": "intake_unavailable", "message": "retry later", "errors": [
            {"loc": ["broker"], "msg": "not leader"}]})

    result, api = invoke(handler, "batch", "--percentage", "30", "--end", "+1h", "--devices", str(devices))
    assert result.exit_code == 1 and len(api.requests) == 10
    assert result.stderr.count("intake_unavailable: retry later (requests 2, 3, 5, 6, 7, 8, 9, 10 of 10)") == 1
    assert "broker: not leader" in result.stderr
    assert "200 commands accepted for 1000 devices (2 of 10 requests)" in result.stderr


def test_schedule_items_need_a_type_and_a_time() -> None:
    result, api = invoke(answer({}), "schedule", "ev-1", '[{"type": "StopCharging"}]')
    assert result.exit_code == 2 and api.requests == []
    assert "schedule item 1 needs triggerTime and type" in result.stderr
    result, api = invoke(answer({}), "schedule", "ev-1", "no-such-file.json")
    assert result.exit_code == 2 and "neither a file nor inline JSON" in result.stderr


def test_batch_needs_one_form_or_the_other() -> None:
    result, api = invoke(accept_batches, "batch", "--percentage", "30")
    assert result.exit_code == 2 and api.requests == []
    assert "--percentage, --end and --devices" in result.stderr


# --- times ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("+10s", NOW + timedelta(seconds=10)),
    ("+5m", NOW + timedelta(minutes=5)),
    ("+1h", NOW + timedelta(hours=1)),
    ("+1h30m", NOW + timedelta(minutes=90)),
    ("+2d", NOW + timedelta(days=2)),
    ("2025-06-01T14:00:00+02:00", NOW),
    ("2025-06-01T12:00:00Z", NOW),
])
def test_times_are_iso_with_a_zone_or_relative_to_now(text: str, expected: datetime) -> None:
    resolved = inputs.resolve_time(text, "--start", now=NOW)
    assert resolved.endswith("Z") and datetime.fromisoformat(resolved) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("2025-06-01T12:00:00", "no time zone"),
    ("tomorrow", "not a time"),
    ("+10", "not a time"),
    ("10s", "not a time"),
])
def test_a_time_without_zone_or_unit_is_a_usage_error(text: str, says: str) -> None:
    result, api = invoke(accept_batches, "batch", "--percentage", "30", "--end", text, "--devices", "-")
    assert result.exit_code == 2 and api.requests == []
    assert says in result.stderr and "--end" in result.stderr


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "key"), [
    (401, "unauthorized"), (403, "forbidden"), (404, "command_not_found"), (409, "command_finished"),
    (503, "intake_unavailable"),
])
def test_api_errors_print_key_and_message_and_exit_non_zero(status: int, key: str) -> None:
    result, api = invoke(refuse(status, key, "it says why"), "cancel", "c-1")
    assert api.requests[0].method == "DELETE" and api.requests[0].url.path == "/v1/commands/c-1"
    assert result.exit_code == 1
    assert f"{key}: it says why" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_error_details_are_printed_too() -> None:
    result, _ = invoke(refuse(409, "cooldown_active", "ev-1 is in its cooldown", cooldownUntil="2025-06-01T12:10:00Z"),
                       "send", "ev-1", "StartCharging")
    assert "cooldown_active: ev-1 is in its cooldown" in result.stderr
    assert "cooldownUntil: 2025-06-01T12:10:00Z" in result.stderr
    result, _ = invoke(refuse(400, "validation_error", "the request is not valid",
                              errors=[{"loc": ["body", "value"], "msg": "value must be >= 0"}]),
                       "send", "pv-1", "LimitFeedIn", "--value", "-1")
    assert "body.value: value must be >= 0" in result.stderr


def test_an_answer_without_a_key_is_named_by_its_status() -> None:
    result, _ = invoke(lambda r: httpx.Response(404, json={"detail": "Not Found"}), "cancel", "c-1")
    assert result.exit_code == 1
    assert "http_404: Not Found (DELETE http://127.0.0.1:8080/v1/commands/c-1)" in result.stderr


def test_connection_refused_says_where_and_to_start_make_run() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    result, _ = invoke(refused, "--url", "http://127.0.0.1:1", "show", "c-1")
    assert result.exit_code == 1
    assert "http://127.0.0.1:1" in result.stderr and "make run" in result.stderr
    assert "Traceback" not in result.output


# --- watch ---------------------------------------------------------------------------------

class Fleet:
    """Commands that move through their statuses, one step per poll."""

    def __init__(self, plans: dict[str, list[dict[str, Any]]]) -> None:
        self.plans = plans
        self.polls: Counter[str] = Counter()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        command_id = request.url.path.rsplit("/", 1)[1]
        if command_id not in self.plans:
            return httpx.Response(404, json={"key": "command_not_found", "message": f"no command {command_id}"})
        plan = self.plans[command_id]
        state = plan[min(self.polls[command_id], len(plan) - 1)]
        self.polls[command_id] += 1
        return httpx.Response(200, json=state)


def ids_file(tmp_path: Path, ids: list[str]) -> str:
    path = tmp_path / "ids.json"
    inputs.write_ids(path, [{"deviceHashId": f"dev-{i}", "id": i} for i in ids])
    return str(path)


def test_watch_reaches_all_terminal_with_shares_and_reasons(tmp_path: Path) -> None:
    fleet = Fleet({
        "a": [command("a", "Succeeded")],
        "b": [command("b", "Pending"), command("b", "Sent"), command("b", "Succeeded")],
        "c": [command("c", "Triggered"), command("c", "Failed", reason="device_offline", detail="no answer in 5 s")],
        "d": [command("d", "Canceled", reason="superseded", supersededBy="x")],
    })
    result, api = invoke(fleet, "--json", "watch", ids_file(tmp_path, ["a", "b", "c", "d"]), "--interval", "0.05")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["finished"] is True and report["total"] == 4
    assert report["counts"] == {"Succeeded": 2, "Failed": 1, "Canceled": 1}
    assert report["shares"] == {"Succeeded": 0.5, "Failed": 0.25, "Canceled": 0.25}
    assert report["reasons"] == [
        {"status": "Failed", "reason": "device_offline", "count": 1, "detail": "no answer in 5 s"},
        {"status": "Canceled", "reason": "superseded", "count": 1, "detail": ""},
    ]
    # A terminal command is never asked again.
    assert fleet.polls == {"a": 1, "b": 3, "c": 2, "d": 1}


def test_the_timeline_shows_the_shares_as_they_were_at_each_checkpoint() -> None:
    tally = progress.Tally(["a", "b", "c", "d"])
    for elapsed, statuses in [(0.4, "PPPP"), (0.9, "SPPP"), (1.6, "SSFP"), (4.8, "SSFS")]:
        for i, status in zip("abcd", statuses, strict=True):
            tally.states[i] = {"status": {"P": "Pending", "S": "Succeeded", "F": "Failed"}[status]}
        tally.record(elapsed)
    timeline = tally.report()["timeline"]
    assert [t["afterS"] for t in timeline] == [0.9, 1.6, 4.8]  # after 1 s, 2 s, and at the end
    assert [t["shares"].get("Succeeded") for t in timeline] == [0.25, 0.5, 0.75]
    assert tally.exit_code() == progress.EXIT_NOT_ALL_SUCCEEDED


def test_watch_exits_zero_when_all_succeeded_and_shows_a_table(tmp_path: Path) -> None:
    fleet = Fleet({i: [command(i, "Sent"), command(i, "Succeeded")] for i in ("a", "b")})
    result, _ = invoke(fleet, "watch", ids_file(tmp_path, ["a", "b"]), "--interval", "0.05")
    assert result.exit_code == 0, result.output
    assert "2 of 2 finished" in result.stdout and "100.0%" in result.stdout


def test_watch_stops_after_n_seconds_with_commands_open(tmp_path: Path) -> None:
    fleet = Fleet({"a": [command("a", "Succeeded")], "b": [command("b", "Pending")]})
    result, _ = invoke(fleet, "--json", "watch", ids_file(tmp_path, ["a", "b", "gone"]), "--seconds", "0.3",
                       "--interval", "0.05")
    assert result.exit_code == 4, result.output
    report = json.loads(result.stdout)
    assert report["finished"] is False and 0.3 <= report["afterS"] < 1
    assert report["counts"] == {"Succeeded": 1, "Pending": 1, "NotFound": 1}
    assert fleet.polls["a"] == 1 and fleet.polls["b"] > 1


def test_watch_keeps_at_most_concurrency_requests_in_flight(tmp_path: Path) -> None:
    in_flight = peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return httpx.Response(200, json=command(request.url.path.rsplit("/", 1)[1], "Succeeded"))

    ids = [f"c{i}" for i in range(60)]
    result, api = invoke(slow, "--json", "watch", ids_file(tmp_path, ids), "--concurrency", "8")  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert len(api.requests) == 60 and 1 < peak <= 8


def test_watch_interrupted_still_shows_what_it_knew(tmp_path: Path) -> None:
    fleet = Fleet({"a": [command("a", "Succeeded")], "b": [command("b", "Sent")]})

    def interrupted(request: httpx.Request) -> httpx.Response:
        if fleet.polls["b"] == 2:
            raise KeyboardInterrupt
        return fleet(request)

    result, _ = invoke(interrupted, "--json", "watch", ids_file(tmp_path, ["a", "b"]), "--interval", "0.05")
    assert result.exit_code == 130, result.output
    assert json.loads(result.stdout)["counts"] == {"Succeeded": 1, "Sent": 1}


def test_watch_gives_up_at_once_when_the_token_is_refused(tmp_path: Path) -> None:
    result, api = invoke(refuse(401, "unauthorized", "a valid bearer token is required"),
                         "watch", ids_file(tmp_path, [f"c{i}" for i in range(50)]), "--concurrency", "1")
    assert result.exit_code == 1 and len(api.requests) == 1
    assert "unauthorized: a valid bearer token is required" in result.stderr


def test_batch_watch_follows_the_commands_it_sent(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return accept_batches(request)
        return httpx.Response(200, json=command(request.url.path.rsplit("/", 1)[1], "Succeeded"))

    devices = tmp_path / "ids.txt"
    devices.write_text("d1\nd2\n")
    result, api = invoke(handler, "--json", "batch", "--percentage", "0", "--end", "+1m", "--devices", str(devices),
                         "--watch", "5", "--interval", "0.05")
    assert result.exit_code == 0, result.output
    assert [r.url.path for r in api.requests[1:]] == ["/v1/commands/cmd-d1", "/v1/commands/cmd-d2"]
    assert json.loads(result.stdout)["watch"]["shares"] == {"Succeeded": 1.0}


# --- inputs and the rest ------------------------------------------------------------------

def test_ids_are_read_from_every_shape_watch_is_given(tmp_path: Path) -> None:
    shapes = {
        "saved.json": json.dumps({"commands": [{"deviceHashId": "d", "id": "a"}, {"deviceHashId": "e", "id": "b"}]}),
        "list.json": json.dumps(["a", "b", "a"]),
        "states.json": json.dumps([command("a"), command("b")]),
        "ids.txt": "a\n\nb\n",
    }
    for name, text in shapes.items():
        (tmp_path / name).write_text(text)
        assert inputs.read_ids(str(tmp_path / name)) == ["a", "b"], name


def test_watch_without_ids_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    result, api = invoke(answer({}), "watch", str(tmp_path / "empty.txt"))
    assert result.exit_code == 2 and api.requests == [] and "holds no command ids" in result.stderr


def test_a_time_that_is_not_text_is_refused_not_a_crash() -> None:
    with pytest.raises(inputs.CliError, match="not a time"):
        inputs.schedule_body([{"triggerTime": 5, "type": "Reset"}])


def test_show_prints_every_field_as_a_table_or_raw_json() -> None:
    state = command(status="Canceled", reason="superseded", supersededBy="c-2", percentage=30,
                    startAt="2025-06-01T12:00:00Z", endAt="2025-06-01T13:00:00Z", createdAt="2025-06-01T11:59:59Z",
                    confirmedAt=None)
    result, api = invoke(answer(state), "show", "c-1")
    assert result.exit_code == 0 and api.requests[0].url.path == "/v1/commands/c-1"
    for name in ("entityId", "supersededBy", "c-2", "percentage", "startAt", "endAt", "createdAt", "superseded"):
        assert name in result.stdout
    result, _ = invoke(answer(state), "--json", "show", "c-1")
    assert json.loads(result.stdout) == state


def test_run_starts_the_stack_through_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "run", lambda: 0)
    assert CliRunner().invoke(app, ["run"]).exit_code == 0
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "as make run does" in result.stdout


def test_ocpp_password_makes_a_password_and_the_hash_the_gateway_checks_it_with() -> None:
    import json as _json

    from dercmd.protocols.ocpp import password_matches

    result = CliRunner().invoke(app, ["--json", "ocpp-password", "cp-7"])
    assert result.exit_code == 0, result.output
    made = _json.loads(result.stdout)
    assert made["chargePointId"] == "cp-7" and 16 <= len(made["password"]) <= 40  # OCPP's AuthorizationKey
    assert password_matches(made["ocppPasswordHash"], made["password"])
    assert not password_matches(made["ocppPasswordHash"], made["password"] + "x")


def test_settings_lists_every_variable_with_its_default() -> None:
    import json as _json

    result = CliRunner().invoke(app, ["--json", "settings"])
    assert result.exit_code == 0, result.output
    rows = {r["variable"]: r for r in _json.loads(result.stdout)}
    assert rows["DERCMD_API_PORT"]["default"] == "8080"
    assert rows["DERCMD_VENDOR_CLOUD_TIMEOUT_S"]["description"]  # a backend's, from its protocol's settings
