"""Every Prometheus metric the worker exports, and the HTTP endpoint that serves them.

One module, conventional names (``worker_`` prefix, base units, ``_total`` counters), bounded
label sets (never a record key). Each :class:`Telemetry` owns its registry, so tests stay
isolated:

>>> t = Telemetry()
>>> t.records.labels(outcome="learned").inc(3)
>>> t.registry.get_sample_value("worker_records_total", {"outcome": "learned"})
3.0
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

import worker

#: Outcomes of a record (label values of worker_records_total).
OUTCOMES = ("learned", "predicted", "filtered", "dead_letter", "replayed")


class Telemetry:
    """The worker's metrics, registered on one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "worker_records", "Records processed, by outcome.", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "worker_dead_letters", "Records sent to the dead-letter output, by reason.", ["reason"], registry=r
        )
        self.drift_events = Counter(
            "worker_drift_events", "Drift events, by signal and detector.", ["signal", "detector", "shard"], registry=r
        )
        self.model_metric = Gauge(
            "worker_model_metric",
            "Prequential model-quality metric (window: rolling or cumulative).",
            ["metric", "window", "shard"],
            registry=r,
        )
        self.feature_drift = Gauge(
            "worker_drift_statistic",
            "Latest drift statistic (PSI or KS) of a watched feature or of the predictions; "
            "label sets bounded by monitor.drift.*.max_features.",
            ["signal", "feature", "shard"],
            registry=r,
        )
        self.processing = Histogram(
            "worker_processing_seconds",
            "Time to process one batch (decode, predict, learn, monitor, encode).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.batch_records = Histogram(
            "worker_batch_records", "Records per processed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000), registry=r,
        )
        self.checkpoints = Counter(
            "worker_checkpoints", "Snapshots written, by outcome.", ["outcome"], registry=r
        )
        self.checkpoint_seconds = Histogram(
            "worker_checkpoint_seconds", "Time to write one snapshot.", registry=r
        )
        self.last_checkpoint = Gauge(
            "worker_last_checkpoint_timestamp_seconds", "When the shard's last snapshot was written.",
            ["shard"], registry=r,
        )
        self.snapshot_bytes = Gauge(
            "worker_snapshot_bytes", "Size of the shard's last snapshot (header included).", ["shard"], registry=r
        )
        self.model_version = Gauge("worker_model_version", "Version of the shard's model.", ["shard"], registry=r)
        self.position = Gauge(
            "worker_shard_position", "Next source position of the shard (line or offset).", ["shard"], registry=r
        )
        self.shards = Gauge("worker_shards", "Shards owned by this worker.", registry=r)
        self.ready = Gauge("worker_ready", "1 when assigned, restored and consuming.", registry=r)
        # Kafka transport
        self.kafka_commits = Counter(
            "worker_kafka_commits",
            "Kafka commits (a transaction with the consumed offsets, or an offset commit), by outcome "
            "(committed, retried, aborted, fenced).",
            ["outcome"], registry=r,
        )
        self.kafka_commit_seconds = Histogram(
            "worker_kafka_commit_seconds", "Time to commit outputs and offsets (flush included).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=r,
        )
        self.kafka_lag = Gauge(
            "worker_kafka_lag_records", "Records between the shard's position and its partition's high watermark.",
            ["shard"], registry=r,
        )
        self.rabbitmq_ready = Gauge(
            "worker_rabbitmq_ready_messages",
            "Messages ready in the shard's queue, not yet delivered to this worker (sampled every few seconds).",
            ["shard"], registry=r,
        )
        self.kafka_errors = Counter(
            "worker_kafka_errors", "Kafka client errors reported by librdkafka, by code name.", ["error"], registry=r
        )
        self.info = Info("worker_build", "Worker and library versions.", registry=r)
        # CPU, memory, file descriptors (Linux /proc; nothing elsewhere): process_* of this
        # process, worker_learner_process_* of the learner process, where the models live
        # (none with learner: inline, or before it started).
        self.learner_pid: int | None = None
        ProcessCollector(registry=r)
        ProcessCollector(namespace="worker_learner", pid=lambda: self.learner_pid or "-", registry=r)
        import river

        self.info.info({"version": worker.__version__, "river": river.__version__})
        for outcome in OUTCOMES:
            self.records.labels(outcome=outcome)
        self.heartbeat = time.monotonic()
        self.is_ready = False

    def set_ready(self, ready: bool) -> None:
        self.is_ready = ready
        self.ready.set(1 if ready else 0)

    def beat(self) -> None:
        """Called by the main loop; /healthz fails when it stops beating."""
        self.heartbeat = time.monotonic()

    def forget_shard(self, shard: str) -> None:
        """Drop a shard's labelled series when it is revoked (keeps label sets bounded)."""
        for metric in (self.model_version, self.position, self.last_checkpoint, self.snapshot_bytes, self.kafka_lag,
                       self.rabbitmq_ready):
            try:
                metric.remove(shard)
            except KeyError:
                pass
        for metric in (self.model_metric, self.drift_events, self.feature_drift):
            for labels in [s.labels for fam in metric.collect() for s in fam.samples]:
                if labels.get("shard") == shard:
                    try:
                        metric.remove(*[labels[n] for n in metric._labelnames])
                    except KeyError:
                        pass


class TelemetryServer:
    """``/metrics``, ``/healthz`` (the loop is alive) and ``/readyz`` on a background thread."""

    def __init__(self, telemetry: Telemetry, host: str, port: int, stall_seconds: float = 120.0):
        tel = telemetry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(tel.registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    ok = time.monotonic() - tel.heartbeat < stall_seconds
                    body, ctype, code = (b"ok\n" if ok else b"stalled\n"), "text/plain", 200 if ok else 503
                elif path == "/readyz":
                    ok = tel.is_ready
                    body, ctype, code = (b"ready\n" if ok else b"not ready\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="telemetry", daemon=True)

    def start(self) -> TelemetryServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
