"""The alert path end to end with real servers: limbic -> Redis, Prometheus (shipped rules) and Alertmanager
(shipped routes) -> a webhook receiver; and every Grafana panel's query against that Prometheus.

Prometheus scrapes and evaluates every second; Alertmanager's waits are cut to a second. Everything else is the
shipped configuration: deploy/prometheus, deploy/alertmanager, grafana/dashboards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from conftest import ROOT, TEST_ALERT_RULES, free_port, running, running_limbic
from limbic.monitors.alerting.alertmanager import ALERT_NAME, AlertmanagerPush
from limbic.monitors.metrics import Metrics
from prometheus_client import generate_latest
from test_api import DESPERATE, MODEL

pytestmark = pytest.mark.slow

ROUTES = {"critical": "limbic-page", "warning": "limbic-notify"}  # deploy/alertmanager/alertmanager.yml
PUSH_RESOLVE_S = 5  # pushed alerts resolve this long after their last event
ALERT_LABELS = {"alertname", "emotion", "severity", "model", "phase"}
# The test rules with actions (docs/actions.md), so the dashboard's action panels have series: desperate queues
# a review, and a panicked rule that never fires (z 50) aborts, so limbic exports its abort counter at 0.
ACTION_RULES = json.dumps(
    {
        "desperate": {**json.loads(TEST_ALERT_RULES)["desperate"], "action": "review"},
        "panicked": {"warning": 50, "action": "abort"},
    }
)


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Calls ``check`` until it returns something truthy; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class _Webhook(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.deliveries.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output quiet


class Receiver(ThreadingHTTPServer):
    """A webhook receiver: keeps every (path, payload) Alertmanager delivers."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Webhook)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def alerts(self, status: str) -> list[tuple[str, dict]]:
        """(receiver path, alert) for each delivered alert of ``status`` from the model under test."""
        with self.lock:
            return [
                (path, alert)
                for path, body in self.deliveries
                for alert in body["alerts"]
                if alert["status"] == status and alert["labels"].get("model") == MODEL
            ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="limbic-observability-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _quick_routes(route: dict) -> None:
    route.update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for child in route.get("routes", []):
        _quick_routes(child)


@pytest.fixture(scope="module")
def alertmanager(receiver: Receiver, workdir: Path) -> Iterator[str]:
    """The shipped Alertmanager config, its webhooks pointed at the receiver (path = receiver name)."""
    config = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    _quick_routes(config["route"])
    for entry in config["receivers"]:
        for hook in entry.get("webhook_configs", []):
            hook["url"] = f"{receiver.url}/{entry['name']}"
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    command = [
        "prometheus-alertmanager",
        f"--config.file={workdir / 'alertmanager.yml'}",
        f"--storage.path={workdir / 'alertmanager-data'}",
        f"--web.listen-address={address}",
        "--cluster.listen-address=",  # no gossip port: one instance
    ]
    with running(command, f"http://{address}/-/ready"):
        yield f"http://{address}"


@pytest.fixture(scope="module")
def limbic(redis_url: str, alertmanager: str, default_model_path: Path) -> Iterator[str]:
    env = {
        "REDIS_URL": redis_url,
        "LIMBIC_ALERT_RULES": ACTION_RULES,
        "LIMBIC_ALERTMANAGER_URL": alertmanager,
        "LIMBIC_ALERTMANAGER_RESOLVE_TIMEOUT": str(PUSH_RESOLVE_S),
    }
    with running_limbic(env) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(limbic: str, alertmanager: str, workdir: Path) -> Iterator[str]:
    """The shipped Prometheus config and rules, scraping the limbic above every second."""
    address = f"127.0.0.1:{free_port()}"
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "deploy/prometheus/rules/limbic.rules.yml")]
    config["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}]
    targets = {"limbic": limbic.removeprefix("http://"), "prometheus": address}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = [
        "prometheus",
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address={address}",
    ]
    with running(command, f"http://{address}/-/ready"):
        yield f"http://{address}"


def query(prometheus: str, promql: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def desperate_chat(limbic: str, prometheus: str) -> dict:
    """One chat that crosses the lowered desperation threshold, sent once Prometheus holds the zeroed alert
    counters (else the rules' increase() would have no sample from before the alert)."""
    zeroed = f'limbic_alerts_total{{emotion="desperate",model="{MODEL}"}} == 0'
    poll(lambda: query(prometheus, zeroed), 30, "Prometheus to scrape limbic's zeroed alert counters")
    response = httpx.post(
        f"{limbic}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": DESPERATE}], "max_tokens": 4},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def firing_spikes(prometheus: str) -> list[dict]:
    return query(prometheus, f'ALERTS{{alertname="LimbicDesperationSpike",alertstate="firing",model="{MODEL}"}}')


def test_desperation_alert_reaches_every_channel_then_resolves(
    desperate_chat: dict, limbic: str, redis_url: str, prometheus: str, receiver: Receiver
):
    events = desperate_chat["limbic"]["alerts"]
    assert events and {e["emotion"] for e in events} == {"desperate"}
    ids, severities = {e["id"] for e in events}, {e["severity"] for e in events}

    listed = httpx.get(f"{limbic}/v1/alerts", params={"emotion": "desperate"}).json()
    assert listed["sink"] == "redis" and ids <= {e["id"] for e in listed["data"]}
    stream = redis.Redis.from_url(redis_url, decode_responses=True).xrevrange("limbic:alerts", count=100)
    assert ids <= {json.loads(fields["event"])["id"] for _, fields in stream}

    firing = poll(lambda: firing_spikes(prometheus), 30, "ALERTS{alertname=LimbicDesperationSpike} firing")
    assert {a["metric"]["severity"] for a in firing} <= severities
    assert all(a["metric"]["emotion"] == "desperate" for a in firing)

    # Prometheus's rule and limbic's own push both reach the receiver that the shipped routes pick by severity.
    def delivered(status: str) -> dict[str, list[tuple[str, dict]]]:
        by_name: dict[str, list[tuple[str, dict]]] = {}
        for path, alert in receiver.alerts(status):
            by_name.setdefault(alert["labels"]["alertname"], []).append((path, alert))
        return by_name if {"LimbicDesperationSpike", ALERT_NAME} <= set(by_name) else {}

    fired = poll(lambda: delivered("firing"), 30, "firing alerts delivered to the webhook receiver")
    for path, alert in [d for name in ("LimbicDesperationSpike", ALERT_NAME) for d in fired[name]]:
        assert path == f"/{ROUTES[alert['labels']['severity']]}"
        assert alert["labels"]["emotion"] == "desperate" and alert["labels"]["severity"] in severities
    for _, alert in fired[ALERT_NAME]:
        assert set(alert["labels"]) == ALERT_LABELS  # no request ids or text in labels
        assert alert["annotations"]["request_id"] == desperate_chat["id"]
        assert alert["annotations"]["event_id"] in ids

    # No more traffic: the rule's one-minute window empties, the pushed alerts pass their endsAt.
    poll(lambda: not firing_spikes(prometheus), 100, "LimbicDesperationSpike to stop firing")
    resolved = poll(lambda: delivered("resolved"), 30, "resolved notifications for both alerts")
    assert {a["labels"]["severity"] for name in resolved for _, a in resolved[name]} <= severities


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "grafana/dashboards/limbic.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def grafana_vars(expr: str) -> str:
    """Fills Grafana's variables as Grafana would for model = the served model, emotions desperate|panicked, and
    a one-hour dashboard range."""
    values = {
        "$__rate_interval": "5m",
        "$__range": "1h",
        "$model": MODEL,
        "$emotion": "(desperate|panicked)",
        "$phase": "(generation|prompt)",
    }
    for name, value in values.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unfilled variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(desperate_chat: dict, prometheus: str):
    poll(
        lambda: query(prometheus, f'limbic_tokens_monitored_total{{phase="generation",model="{MODEL}"}} > 0'),
        30,
        "Prometheus to scrape the chat's tokens",
    )
    queries = dashboard_queries()
    assert len(queries) >= 10
    for title, expr in queries:
        result = query(prometheus, grafana_vars(expr))
        values = [float(r["value"][1]) for r in result]
        assert any(math.isfinite(v) for v in values), f"{title}: {expr} returned {result}"

    dashboard = json.loads((ROOT / "grafana/dashboards/limbic.json").read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
        found = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": grafana_vars(metric)}).json()[
            "data"
        ]
        assert {"model": MODEL, "emotion": "desperate"}[label] in found, (variable["name"], found)


def test_review_action_reaches_the_metrics_the_dashboard_and_rules_read(desperate_chat: dict, prometheus: str):
    """The desperate rule's action (review) is on its events, counted as a mitigation and queued for review."""
    assert {e.get("action") for e in desperate_chat["limbic"]["alerts"]} == {"review"}
    for promql, what in (
        (f'limbic_mitigations_total{{action="review",emotion="desperate",model="{MODEL}"}} > 0', "review mitigations"),
        (f'limbic_reviews_queued_total{{model="{MODEL}"}} > 0', "a queued review"),
        (f'max by (model) (limbic_reviews_open{{model="{MODEL}"}}) > 0', "an open review"),
    ):
        poll(lambda promql=promql: query(prometheus, promql), 30, f"Prometheus to scrape {what}")


def test_pushed_alerts_land_in_alertmanager_and_failures_are_counted(alertmanager: str):
    metrics = Metrics(["desperate"], "push-test", lambda: 0.0, lambda: 0.0)
    now = dt.datetime.now(dt.UTC)
    event = {
        "id": "e1",
        "time": now.isoformat(timespec="milliseconds"),
        "model": "push-test",
        "request_id": "chatcmpl-1",
        "emotion": "desperate",
        "severity": "warning",
        "phase": "generation",
        "score": 4.2,
        "threshold": 3.0,
        "token_start": 3,
        "token_index": 5,
    }

    async def push_to_both() -> bool:
        good = AlertmanagerPush(alertmanager, metrics.push_errors.labels("push-test"), resolve_timeout=60)
        good.submit(event)  # in the background, as Monitor.dispatch does; close() waits for it
        await good.close()
        dead = AlertmanagerPush(f"http://127.0.0.1:{free_port()}", metrics.push_errors.labels("push-test"))
        accepted = await dead.push(event)
        await dead.close()
        return accepted

    assert asyncio.run(push_to_both()) is False  # nothing listens there: counted, not raised
    assert 'limbic_alertmanager_push_errors_total{model="push-test"} 1.0' in generate_latest(metrics.registry).decode()
    stored = httpx.get(f"{alertmanager}/api/v2/alerts", params={"filter": 'model="push-test"'}).json()
    assert len(stored) == 1
    alert = stored[0]
    assert alert["labels"] == {
        "alertname": ALERT_NAME,
        "emotion": "desperate",
        "severity": "warning",
        "model": "push-test",
        "phase": "generation",
    }
    assert alert["annotations"]["request_id"] == "chatcmpl-1" and alert["annotations"]["event_id"] == "e1"
    starts, ends = (dt.datetime.fromisoformat(alert[k]) for k in ("startsAt", "endsAt"))
    assert abs((starts - now).total_seconds()) < 0.01 and ends - starts == dt.timedelta(seconds=60)
