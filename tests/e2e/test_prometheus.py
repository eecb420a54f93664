"""The dashboard and the alert rules, checked against a real Prometheus (Debian's ``prometheus``
package): ``promtool`` accepts deploy's config and rules and passes their unit tests
(tests/prometheus/alerts_test.yml: each alert fires on series made to fire it, with its labels
and words, and none fires on a healthy stack's); a Prometheus scraping the running stack finds
data for every query of every dashboard panel and for the query of every alert (its expression
without the threshold), evaluates every rule, fires the dead-letter alert, holds the
circuit-open alert pending, and keeps the alerts of a healthy stack quiet.

The static checks (the dashboard is provisionable, compose mounts the rules beside the config,
every rule has ``for``, a severity and annotations) need nothing running."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dercmd.launcher import SERVICES, Stack, free_port

from ..conftest import _unavailable, wait_for
from .conftest import Api, Kafka, running_stack

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dercmd.json"
CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "alerts.yml"
#: promtool's unit tests of the rules: synthetic series, and the alerts they must (not) fire.
RULE_TESTS = Path(__file__).parents[1] / "prometheus" / "alerts_test.yml"
#: An alert's expression is "<query> <comparison> <threshold>": the query must have data.
THRESHOLD = re.compile(r"^(?P<query>.+?)\s*(?:>=|<=|==|!=|>|<)\s*[-+]?[0-9.]+(?:e[-+]?[0-9]+)?\s*$", re.S)
#: Grafana's variables, as Grafana would set them for the last few minutes at a 1 s scrape.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "5s", "__range": "5m"}
#: Alerts that must not be active on a healthy stack once the traffic has ended.
QUIET = {"DercmdServiceDown", "DercmdPartitionStalled", "DercmdConsumerLagHigh", "DercmdCompletionSlow",
         "DercmdNothingFinishes"}


def grafana(expr: str) -> str:
    """``expr`` with Grafana's variables (``$name`` and ``${name}``) replaced; none unknown."""
    done = re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m[1]], expr)
    assert "$" not in done, expr
    return done


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    return [(p["title"], grafana(t["expr"])) for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alert_query(rule: dict[str, Any]) -> str:
    match = THRESHOLD.match(rule["expr"])
    assert match, f"{rule['alert']}: not '<query> <comparison> <threshold>': {rule['expr']}"
    return match["query"]


# -- static: what Grafana and the compose stack load ------------------------------------------


def test_the_dashboard_is_provisionable() -> None:
    board = dashboard()
    (source,) = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dercmd.yml").read_text())["providers"]
    grafana_mounts = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana_mounts
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], (panel["title"], target["refId"])
            grafana(target["expr"])
        pos = panel["gridPos"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert pos["x"] + pos["w"] <= 24 and not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_compose_loads_the_rules_beside_the_config() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    mounts = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert config["rule_files"]
    for name in config["rule_files"]:
        assert (DEPLOY / name).is_file(), name
        assert f"./deploy/{name}:/etc/prometheus/{name}:ro" in mounts, name


def test_every_alert_has_a_query_a_duration_a_severity_and_words() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        alert_query(rule)
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# -- a real Prometheus ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus or not promtool:
        _unavailable("Prometheus", FileNotFoundError("prometheus/promtool (Debian: apt-get install prometheus)"))
    assert prometheus and promtool
    return prometheus, promtool


def test_promtool_accepts_the_committed_config_and_rules(tools: tuple[str, str]) -> None:
    for what, path in (("config", CONFIG), ("rules", RULES)):
        done = subprocess.run([tools[1], "check", what, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_on_series_that_should_fire_it_and_none_on_a_healthy_stack(tools: tuple[str, str]) -> None:
    tested = {t["alertname"] for g in yaml.safe_load(RULE_TESTS.read_text())["tests"] for t in g["alert_rule_test"]
              if t["exp_alerts"]}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert needs a case in which it fires"
    done = subprocess.run([tools[1], "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module", params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A short retry window, so that a command to a device whose backend fails every call ends
    # Failed soon; a circuit that opens after two failed calls; unknown deliveries asked about soon.
    yield from running_stack(request, tmp_path_factory, dispatch_retry_for_s="2", dispatch_breaker_failures="2",
                             dispatch_unknown_grace_s="0.5")


@pytest.fixture(scope="module")
def prometheus(tools: tuple[str, str], stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus scraping every service of the stack each second, with deploy's rules file."""
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [stack.url(name).removeprefix("http://")]}]}
                           for name in SERVICES],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([tools[0], f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(work / 'prometheus.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, deadline_s=30, what="prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def rules_now(url: str) -> dict[str, dict[str, Any]]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return {r["name"]: r for g in groups for r in g["rules"]}


def alerts_now(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]


@pytest.mark.e2e
def test_every_panel_and_alert_query_returns_data_from_the_running_stack(prometheus: str, stack: Stack) -> None:
    api = Api(stack)

    # Scraped once before the traffic, as a Prometheus that runs all along: a counter's first
    # increment then shows as an increase.
    def every_target_up() -> bool:
        return len(query(prometheus, "up == 1")) == len(SERVICES)

    wait_for(every_target_up, deadline_s=30, what="prometheus to scrape every service")
    # Traffic that every panel shows: commands that succeed, a cooldown refusal, a refused bad
    # input, a dead letter; calls a backend refuses (5xx: retries, its circuit opens, a command
    # fails) and calls whose answer is lost (an unknown delivery, asked about: delivered).
    api.sim.put("/sim/faults", json={"devices": ["ev-3"], "probability": 1, "kinds": ["5xx"]}).raise_for_status()
    api.sim.put("/sim/faults", json={"devices": ["dev-1"], "probability": 1, "kinds": ["drop_connection"]}).raise_for_status()
    sent = {e: api.post(e, body) for e, body in (("ev-1", {"type": "StartCharging"}), ("ev-2", {"type": "StartCharging"}),
                                                  ("cp-1", {"type": "StartCharging"}), ("pv-3", {"type": "StopFeedIn"}),
                                                  ("ev-3", {"type": "StartCharging"}), ("dev-1", {"type": "StopFeedIn"}))}
    assert all(r.status_code == 201 for r in sent.values()), {e: r.text for e, r in sent.items()}
    ids = {e: r.json()["id"] for e, r in sent.items()}
    assert api.wait_terminal(ids["pv-3"])["status"] == "Succeeded"
    assert api.post("pv-3", {"type": "Reset"}).json()["key"] == "cooldown_active"
    assert api.post("pv-1", {"type": "Explode"}).json()["key"] == "validation_error"
    Kafka(stack.settings.kafka_bootstrap).produce("dercmd.commands.requests", [(b"x", b"\x00 not json", [])])
    ended = {e: api.wait_terminal(c) for e, c in ids.items()}
    api.sim.delete("/sim/faults").raise_for_status()
    assert ended["ev-3"]["status"] == "Failed", ended["ev-3"]
    assert all(v["status"] == "Succeeded" for e, v in ended.items() if e != "ev-3"), ended

    queries = dashboard_queries() + [(f"alert {r['alert']}", alert_query(r)) for r in alert_rules()]
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [f"{title}: {expr}" for title, expr in queries if not query(prometheus, expr)]
        return not empty

    try:
        wait_for(all_have_data, deadline_s=60, what="every dashboard and alert query to return data")
    except AssertionError:
        raise AssertionError("queries without data:\n" + "\n".join(empty)) from None

    # Every rule of deploy's file is loaded and evaluates.
    assert set(rules_now(prometheus)) == {r["alert"] for r in alert_rules()}
    wait_for(lambda: all(r.get("health") == "ok" for r in rules_now(prometheus).values()), deadline_s=30,
             what="every rule to evaluate")
    bad = {name: r.get("lastError") for name, r in rules_now(prometheus).items() if r.get("health") != "ok"}
    assert not bad, bad

    # The dead letter fires its alert at once; the open circuit goes pending (it fires after 1 minute).
    def active(name: str, states: set[str], **labels: str) -> bool:
        return any(a["labels"]["alertname"] == name and a["state"] in states and labels.items() <= a["labels"].items()
                   for a in alerts_now(prometheus))

    def until(probe: Callable[[], bool], what: str) -> None:
        try:
            wait_for(probe, deadline_s=30, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; alerts now: {alerts_now(prometheus)}") from None

    until(lambda: active("DercmdDeadLetters", {"firing"}, topic="dercmd.commands.requests"), "the dead-letter alert to fire")
    until(lambda: active("DercmdCircuitOpen", {"pending", "firing"}, backend="ev-aggregator"),
          "the circuit-open alert for ev-aggregator")

    # A healthy stack: nothing down, stalled, behind, slow or stuck.
    def quiet() -> bool:
        return not any(name in QUIET for name in {a["labels"]["alertname"] for a in alerts_now(prometheus)})

    until(quiet, "the alerts of a healthy stack to be inactive")
