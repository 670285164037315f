"""Deployment artifacts: Prometheus rules and config, compose, Kubernetes, Grafana.

promtool comes from Debian's ``prometheus`` package (tests/run.sh installs it). Without it
the promtool checks are skipped, except under ``CI=true`` where they fail.
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

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMQL_FUNCS = {
    "sum", "rate", "increase", "histogram_quantile", "clamp_min", "time", "by", "up",
    "avg", "max", "min", "count", "irate", "le", "on", "ignoring", "without",
}


def exported_names() -> set[str]:
    """Every series name the worker exports: from the families of a fresh Telemetry's
    registry (labelled metrics with no series yet included), as Prometheus names them."""
    from worker.monitoring.telemetry import Telemetry

    names: set[str] = set()
    for fam in Telemetry().registry.collect():
        if fam.type == "counter":
            names |= {f"{fam.name}_total", f"{fam.name}_created"}
        elif fam.type in ("histogram", "summary"):
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count", f"{fam.name}_created"}
        elif fam.type == "info":
            names.add(f"{fam.name}_info")
        else:
            names.add(fam.name)
    # the learner process's (present once it runs: see Telemetry.learner_pid)
    names |= {n.replace("process_", "worker_learner_process_", 1) for n in names if n.startswith("process_")}
    return names


def used_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:worker|process)_[a-z0-9_]+\b", expr))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (tests/run.sh installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def test_exported_names_are_parsed():
    names = exported_names()
    assert "worker_records_total" in names
    assert "worker_processing_seconds_bucket" in names
    assert "worker_ready" in names


def test_promtool_check_config(tmp_path):
    tool = promtool()
    for f in ("prometheus.yml", "alerts.yml"):
        shutil.copy(DEPLOY / "prometheus" / f, tmp_path / f)
    r = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_falling_behind_fires_on_a_growing_backlog_only(tmp_path):
    """promtool's rule unit test: a Kafka lag growing past 10,000 and a RabbitMQ backlog
    growing likewise fire WorkerFallingBehind; a large backlog being worked off does not."""
    tool = promtool()
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    labels = {"instance": "w:9108", "job": "worker"}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == "WorkerFallingBehind")
    spec = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'worker_kafka_lag_records{instance="w:9108",job="worker",shard="in:0"}',
                 "values": "5000+500x60"},
                {"series": 'worker_rabbitmq_ready_messages{instance="w:9108",job="worker",shard="ex.1"}',
                 "values": "20000+300x60"},
                {"series": 'worker_kafka_lag_records{instance="w:9108",job="worker",shard="in:1"}',
                 "values": "90000-1000x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "WorkerFallingBehind", "exp_alerts": []},
                {"eval_time": "45m", "alertname": "WorkerFallingBehind", "exp_alerts": [
                    {"exp_labels": {**labels, "severity": "warning", "shard": shard},
                     "exp_annotations": {"summary": f"Shard {shard} is falling behind on w:9108",
                                         "description": rule["annotations"]["description"]}}
                    for shard in ("in:0", "ex.1")
                ]},
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec))
    r = subprocess.run([tool, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_use_only_exported_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exported = exported_names()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "WorkerDown", "WorkerNotReady", "WorkerDeadLetterRateHigh", "WorkerConceptDrift",
        "WorkerModelAccuracyDrop", "WorkerCheckpointStale", "WorkerProcessingSlow",
    }
    for a in alerts:
        unknown = used_names(a["expr"]) - exported
        assert not unknown, f"{a['alert']} uses metrics the worker does not export: {unknown}"


def test_dashboard_uses_only_exported_metrics():
    exported = exported_names()
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "worker.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        unknown = used_names(expr) - exported
        assert not unknown, f"dashboard query {expr!r} uses unknown metrics {unknown}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_parse(tmp_path):
    """Every dashboard query is valid PromQL: promtool checks them as recording rules."""
    tool = promtool()
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "worker.json").read_text())
    rules = [{"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": t["expr"]}
             for p in dash["panels"] for t in p.get("targets", [])]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "worker.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_structure():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"kafka", "worker", "feeder", "prometheus", "grafana"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["feeder"]["command"][0] == "produce"
    from worker.__main__ import build_parser

    for feeder in ("feeder", "feeder-rabbitmq"):  # the commands parse
        build_parser().parse_args(services[feeder]["command"])
    assert services["worker-rabbitmq"]["profiles"] == ["rabbitmq"]
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"compose mounts a missing path: {src}"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_compose_config_with_docker():
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip("docker compose plugin is not installed")
    r = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_worker_configs_are_valid():
    from worker.config import load_settings

    load_settings(DEPLOY / "config" / "worker.yaml", env={})
    load_settings(DEPLOY / "config" / "worker-rabbitmq.yaml", env={})
    cm = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    load_settings(data=yaml.safe_load(cm["data"]["config.yaml"]), env={})


def test_kubernetes_manifests():
    docs = {}
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and "kind" in doc:
                docs[doc["kind"]] = doc
    assert set(docs) >= {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget"}
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 10
    c = spec["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"][0]["containerPort"] == 9108


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") or "FROM python:3.11-slim" in text
    assert "FROM python:3.11-slim" in text
    assert re.search(r"^USER (?!root)", text, re.M)
    assert 'ENTRYPOINT ["worker"]' in text
    assert 'CMD ["run", "--config", "/etc/worker/config.yaml"]' in text
    assert "/healthz" in text
