"""End-to-end latency, record to prediction, at a fixed input rate.

The worker runs as users run it (``python -m worker run -c config.yaml``) with
``record.timestamp: sent``, so each prediction's ``ts`` is the send time that the producer
stamped into the record. A producer thread sends records at ``rate`` per second (each
stamped with ``time.time()`` just before ``produce``; ``linger.ms=1``), and a
``read_committed`` consumer of the predictions topic computes ``arrival - ts`` for each
prediction: for exactly-once that includes waiting for the transaction to commit. Before
the clock starts, 200 warm-up records are sent and their predictions awaited (group join,
first fetch, model built); the first ``warmup`` seconds of the rated phase are not counted
either (3 s: on Apache Kafka the broker's JVM is still warming up then, and records sent
with no worker at all have a p99 of 100-440 ms in its first two seconds against ~6 ms
after the third).

:func:`measure` also reports the predictions per second that arrived while the feeder was
sending: offered more than the worker can take, that is its maximum rate with the feeder
and the reader on the same cores, which is what "half load" is taken from.
"""

from __future__ import annotations

import shutil
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

WARMUP = 3.0  #: seconds of the rated phase not counted (the ramp), unless ``measure`` is told otherwise
WARMUP_RECORDS = 200  #: answered before the rated phase starts


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


def _produce(producer: Producer, topic: str, records: list[tuple[dict, int]], rate: float, seconds: float) -> None:
    """Send ``rate * seconds`` records, each stamped with ``time.time()`` just before its ``produce``.

    The feeder shares the two cores with the worker, the broker and the reader: it sends
    what is due every half millisecond and encodes only the stamp per record.
    """
    bodies = [orjson.dumps({"x": x, "y": y})[1:-1] for x, y in records]  # b'"x":{...},"y":1'
    total = int(rate * seconds)
    produce, now = producer.produce, time.time
    started = time.monotonic()
    i = 0
    while i < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        while i < due:
            produce(topic, b'{"id":%d,%s,"sent":%r}' % (i, bodies[i % len(bodies)], now()))
            i += 1
        producer.poll(0)
        time.sleep(0.0005)
    producer.flush(30)


def _warm_up(producer: Producer, topic: str, consumer: Consumer, records: list[tuple[dict, int]],
             timeout: float = 60.0) -> None:
    """Send ``WARMUP_RECORDS`` and wait for their predictions: the worker is assigned, fetching and
    has its model, and the feeder's producer is connected, before the clock starts (their
    start-up is not the latency being measured)."""
    for i in range(WARMUP_RECORDS):
        x, y = records[i % len(records)]
        producer.produce(topic, orjson.dumps({"id": -1 - i, "x": x, "y": y, "sent": time.time()}))
    producer.flush(30)
    seen = 0
    deadline = h.Deadline(timeout)
    while seen < WARMUP_RECORDS:
        if deadline.passed():
            raise h.ChildFailed(f"the worker did not answer {WARMUP_RECORDS} warm-up records in {timeout:.0f} s")
        seen += sum(1 for m in consumer.consume(1000, 0.1) if m.error() is None)


def measure(bootstrap: str, consumer_conf: dict, delivery: str, rate: float, seconds: float,
            records: list[tuple[dict, int]], timeout: float = 120.0, overrides: dict | None = None,
            warmup: float = WARMUP, contender: str = "worker") -> dict:
    """p50/p99/max latency (ms) of the records sent at ``rate`` per second during ``seconds``,
    the first ``warmup`` of them not counted.

    ``contender``: ``worker``, or ``relay`` (:mod:`bench.relay`, the floor: the same broker
    trips with nothing done to the records). ``overrides``: worker settings merged section
    by section into the configuration.
    """
    from tests.brokers import free_port
    from worker.transports.kafka import create_topics

    tag = h.unique(f"lat-{delivery.replace('_', '-')}")
    topic = f"{tag}-in"
    create_topics(bootstrap, [topic, *h.outputs(tag).values()])
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    port = free_port()
    if contender == "relay":
        cmd = h.python_cmd("bench.relay", "--bootstrap", bootstrap, "--topic", topic, "--out", h.outputs(tag)["predictions"],
                           "--consumer-config", h.json_arg(consumer_conf),
                           *(["--transactional"] if delivery == "exactly_once" else []))
    else:
        config = _config(workdir, bootstrap, topic, tag, delivery, consumer_conf, port, overrides)
        cmd = h.python_cmd("worker", "run", "-c", str(config))
    worker = h.start(cmd, workdir / "worker.log")
    try:
        if contender == "worker" and not _ready(port, 60):
            raise h.ChildFailed(f"the worker was not ready in 60 s (log {workdir / 'worker.log'})")
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{tag}-reader", "isolation.level": "read_committed",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        consumer.assign([TopicPartition(h.outputs(tag)["predictions"], 0, OFFSET_BEGINNING)])
        feeder = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "enable.idempotence": True})
        _warm_up(feeder, topic, consumer, records)
        expected = int(rate * seconds)
        producer = threading.Thread(target=_produce, args=(feeder, topic, records, rate, seconds), daemon=True)
        started = time.time()
        producer.start()
        latencies: list[float] = []
        transit: list[float] = []  # the part after the worker: its producer, the broker, this reader
        received = 0
        in_window = 0  # predictions that arrived while the feeder was sending (after the ramp)
        deadline = h.Deadline(seconds + timeout)
        while received < expected and not deadline.passed():
            # What is there now, else wait for one: consume(n, timeout) would hold every
            # message until n arrived or the timeout passed, adding up to 100 ms to each.
            for m in consumer.consume(1000, 0) or consumer.consume(1, 0.1):
                if m.error() is not None:
                    continue
                now = time.time()
                out = orjson.loads(m.value())
                ts = out["ts"] if "ts" in out else out["sent"]  # a prediction, or the record the relay forwarded
                received += 1
                if started + warmup <= now < started + seconds:
                    in_window += 1
                if ts - started >= warmup:
                    latencies.append(now - ts)
                    transit.append(now - m.timestamp()[1] / 1000)  # since the worker's produce()
        producer.join(timeout)
        consumer.close()
    finally:
        h.stop(worker, grace=15)
    shutil.rmtree(workdir, ignore_errors=True)  # (kept when the measurement failed: the log is there)
    latencies.sort()
    transit.sort()
    return {
        "delivery": delivery, "rate": rate, "seconds": seconds, "warmup_s": warmup, "sent": expected,
        "received": received, "counted": len(latencies),
        "p50_ms": 1000 * _percentile(latencies, 0.50) if latencies else None,
        "p99_ms": 1000 * _percentile(latencies, 0.99) if latencies else None,
        "max_ms": 1000 * latencies[-1] if latencies else None,
        "transit_p50_ms": 1000 * _percentile(transit, 0.50) if transit else None,
        "transit_p99_ms": 1000 * _percentile(transit, 0.99) if transit else None,
        # predictions per second while the feeder and this reader ran: above the worker's
        # capacity, its maximum rate on cores shared with them
        "throughput": in_window / (seconds - warmup) if seconds > warmup else None,
    }
