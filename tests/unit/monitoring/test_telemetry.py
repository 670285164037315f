"""worker.monitoring.telemetry: isolated registries and the HTTP endpoint (port 0)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from worker.monitoring.telemetry import OUTCOMES, Telemetry, TelemetryServer


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_each_telemetry_has_its_own_registry():
    a, b = Telemetry(), Telemetry()
    a.records.labels(outcome="learned").inc(5)
    assert a.registry.get_sample_value("worker_records_total", {"outcome": "learned"}) == 5
    assert b.registry.get_sample_value("worker_records_total", {"outcome": "learned"}) == 0
    for outcome in OUTCOMES:  # every outcome exported from the start (rate() works from zero)
        assert b.registry.get_sample_value("worker_records_total", {"outcome": outcome}) == 0


def test_metric_names_follow_conventions():
    names = {m.name for m in Telemetry().registry.collect()}
    assert {"worker_records", "worker_dead_letters", "worker_drift_events", "worker_model_metric",
            "worker_processing_seconds"} <= names
    assert all(n.startswith(("worker_", "process_")) for n in names)  # (process_*: the client's standard ones)
    assert not any(n.endswith(("_ms", "_milliseconds")) for n in names)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process collectors read Linux's /proc")
def test_process_metrics_of_the_worker_and_of_its_learner_process():
    t = Telemetry()
    rss = "worker_learner_process_resident_memory_bytes"
    assert t.registry.get_sample_value("process_resident_memory_bytes") > 10 * 2**20
    assert t.registry.get_sample_value(rss) is None  # no learner process (yet, or learner: inline)
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 * 2**20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        t.learner_pid = child.pid
        deadline = time.monotonic() + 20
        while (t.registry.get_sample_value(rss) or 0) < 64 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.registry.get_sample_value(rss) >= 64 * 2**20  # its memory, not this process's
        assert t.registry.get_sample_value("worker_learner_process_cpu_seconds_total") >= 0
    finally:
        child.communicate(b"", timeout=20)
    assert t.registry.get_sample_value(rss) is None  # gone with the process


def test_forget_shard_drops_its_series():
    t = Telemetry()
    t.position.labels(shard="s0").set(5)
    t.model_metric.labels(metric="accuracy", window="rolling", shard="s0").set(0.9)
    t.model_metric.labels(metric="accuracy", window="rolling", shard="s1").set(0.8)
    t.snapshot_bytes.labels(shard="s0").set(1234)
    t.forget_shard("s0")
    assert t.registry.get_sample_value("worker_shard_position", {"shard": "s0"}) is None
    assert t.registry.get_sample_value("worker_snapshot_bytes", {"shard": "s0"}) is None
    assert t.registry.get_sample_value("worker_model_metric", {"metric": "accuracy", "window": "rolling", "shard": "s0"}) is None
    assert t.registry.get_sample_value("worker_model_metric", {"metric": "accuracy", "window": "rolling", "shard": "s1"}) == 0.8


@pytest.fixture
def server():
    t = Telemetry()
    srv = TelemetryServer(t, "127.0.0.1", 0).start()
    yield t, srv
    srv.close()


def test_metrics_endpoint(server):
    t, srv = server
    assert srv.port > 0
    t.dead_letters.labels(reason="invalid_json").inc(2)
    code, body = get(srv.port, "/metrics")
    assert code == 200
    assert 'worker_dead_letters_total{reason="invalid_json"} 2.0' in body
    assert "worker_build_info" in body


def test_readyz_is_503_until_ready(server):
    t, srv = server
    assert get(srv.port, "/readyz")[0] == 503
    t.set_ready(True)
    assert get(srv.port, "/readyz") == (200, "ready\n")
    assert t.registry.get_sample_value("worker_ready") == 1
    t.set_ready(False)
    assert get(srv.port, "/readyz")[0] == 503


def test_healthz_follows_the_heartbeat(server):
    t, srv = server
    t.beat()
    assert get(srv.port, "/healthz") == (200, "ok\n")
    t.heartbeat = time.monotonic() - 10_000  # a loop that stopped beating long ago
    assert get(srv.port, "/healthz")[0] == 503
    assert get(srv.port, "/nope")[0] == 404
