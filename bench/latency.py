"""End-to-end latency, record to prediction, at a fixed input rate.

The worker runs as users run it (``python -m worker run -c config.yaml``) with
``record.timestamp: sent``, so each prediction's ``ts`` is the send time that the producer
stamped into the record. A producer thread sends records at ``rate`` per second (each
stamped with ``time.time()`` just before ``produce``; ``linger.ms=1``), and a
``read_committed`` consumer of the predictions topic computes ``arrival - ts`` for each
prediction: for exactly-once that includes waiting for the transaction to commit. The
first second of records is a warm-up and not counted.
"""

from __future__ import annotations

import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from bench import harness as h
from bench.common import REFERENCE_PIPELINE

WARMUP = 1.0


def _config(path: Path, bootstrap: str, topic: str, tag: str, delivery: str, consumer_conf: dict, port: int,
            overrides: dict | None = None) -> Path:
    config = {
        "source": {"type": "kafka", "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": f"{tag}-group",
                                              "consumer": consumer_conf, "transactional_id": f"{tag}-txn"}},
        "outputs": h.outputs(tag),
        "record": {"timestamp": "sent"},
        "model": {"pipeline": REFERENCE_PIPELINE},
        "checkpoint": {"store": f"file://{path / 'state'}"},
        "telemetry": {"port": port, "host": "127.0.0.1", "log_level": "WARNING"},
        "delivery": delivery,
    }
    for section, values in (overrides or {}).items():  # e.g. {"limits": {"batch_size": 50}}
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    cfg = path / f"{tag}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def _ready(port: int, timeout: float) -> bool:
    deadline = h.Deadline(timeout)
    while not deadline.passed():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _produce(bootstrap: str, topic: str, records: list[tuple[dict, int]], rate: float, seconds: float) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "enable.idempotence": True})
    total = int(rate * seconds)
    started = time.monotonic()
    for i in range(total):
        ahead = started + i / rate - time.monotonic()
        if ahead > 0.0005:
            time.sleep(ahead)
        x, y = records[i % len(records)]
        producer.produce(topic, orjson.dumps({"id": i, "x": x, "y": y, "sent": time.time()}))
        producer.poll(0)
    producer.flush(30)


def measure(bootstrap: str, consumer_conf: dict, delivery: str, rate: float, seconds: float,
            records: list[tuple[dict, int]], timeout: float = 120.0, overrides: dict | None = None) -> dict:
    """p50/p99/max latency (ms) of ``seconds`` of records sent at ``rate`` per second.

    ``overrides``: worker settings merged section by section into the configuration.
    """
    from tests.brokers import free_port
    from worker.transports.kafka import create_topics

    tag = h.unique(f"lat-{delivery.replace('_', '-')}")
    topic = f"{tag}-in"
    create_topics(bootstrap, [topic, *h.outputs(tag).values()])
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    port = free_port()
    config = _config(workdir, bootstrap, topic, tag, delivery, consumer_conf, port, overrides)
    worker = h.start(h.python_cmd("worker", "run", "-c", str(config)), workdir / "worker.log")
    try:
        if not _ready(port, 60):
            raise h.ChildFailed(f"the worker was not ready in 60 s (log {workdir / 'worker.log'})")
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{tag}-reader", "isolation.level": "read_committed",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        consumer.assign([TopicPartition(h.outputs(tag)["predictions"], 0, OFFSET_BEGINNING)])
        expected = int(rate * seconds)
        producer = threading.Thread(target=_produce, args=(bootstrap, topic, records, rate, seconds), daemon=True)
        started = time.time()
        producer.start()
        latencies: list[float] = []
        received = 0
        deadline = h.Deadline(seconds + timeout)
        while received < expected and not deadline.passed():
            for m in consumer.consume(1000, 0.1):
                if m.error() is not None:
                    continue
                now = time.time()
                ts = orjson.loads(m.value())["ts"]
                received += 1
                if ts - started >= WARMUP:
                    latencies.append(now - ts)
        producer.join(timeout)
        consumer.close()
    finally:
        h.stop(worker, grace=15)
    latencies.sort()
    return {
        "delivery": delivery, "rate": rate, "seconds": seconds, "sent": expected, "received": received,
        "p50_ms": 1000 * _percentile(latencies, 0.50) if latencies else None,
        "p99_ms": 1000 * _percentile(latencies, 0.99) if latencies else None,
        "max_ms": 1000 * latencies[-1] if latencies else None,
    }
