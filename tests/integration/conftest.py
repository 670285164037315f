"""Real brokers (once per session) and helpers to run worker processes against them.

Every wait is bounded; only processes started here are signalled, by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError

try:
    from tests.brokers import TANSU_CONSUMER_OVERRIDES, ApacheKafka, RabbitMQ, Tansu, start_or_skip
except ImportError:  # pragma: no cover
    from brokers import TANSU_CONSUMER_OVERRIDES, ApacheKafka, RabbitMQ, Tansu, start_or_skip

from worker.config import ModelSettings
from worker.feeder import feed, synthetic
from worker.models import build_model

REPO = Path(__file__).resolve().parents[2]
PIPELINE = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    broker = ApacheKafka()
    start_or_skip(broker, tmp_path_factory.mktemp("kafka"))
    yield broker
    broker.stop()
    broker.cleanup()


@pytest.fixture(scope="session")
def tansu(tmp_path_factory):
    broker = Tansu()
    start_or_skip(broker, tmp_path_factory.mktemp("tansu"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    """A private RabbitMQ node (own epmd, cookie, ports); ``rabbitmq.url`` is its AMQP URL."""
    broker = RabbitMQ()
    start_or_skip(broker, tmp_path_factory.mktemp("rabbitmq"))
    yield broker
    broker.stop()
    broker.cleanup()


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Topics:
    """One test's topic names: input, outputs and the checkpoint topic."""

    def __init__(self, broker, partitions: int = 2):
        tag = uuid.uuid4().hex[:8]
        self.input = f"in-{tag}"
        self.predictions = f"pred-{tag}"
        self.drift = f"drift-{tag}"
        self.metrics = f"metrics-{tag}"
        self.dead = f"dead-{tag}"
        self.state = f"state-{tag}"
        self.group = f"g-{tag}"
        broker.create_topics([self.input], partitions=partitions)
        broker.create_topics([self.predictions, self.drift, self.metrics, self.dead], partitions=2)


def worker_config(broker, topics: Topics, tmp_path: Path, *, delivery="exactly_once", store="file",
                  tansu=False, consumer=None, **over) -> dict:
    consumer_conf = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, **(consumer or {})}
    if tansu:
        consumer_conf.update(TANSU_CONSUMER_OVERRIDES)
    cfg = {
        "source": {"type": "kafka", "kafka": {
            "bootstrap_servers": broker.bootstrap, "topics": [topics.input], "group_id": topics.group,
            "consumer": consumer_conf, "producer": {"transaction.timeout.ms": 10000},
            "transactional_id": over.pop("transactional_id", "w1"), "commit_every_ms": 100,
        }},
        "outputs": {"predictions": topics.predictions, "drift": topics.drift, "metrics": topics.metrics,
                    "dead_letter": topics.dead},
        "record": {"key": "key"},
        "model": {"task": "classification", "pipeline": PIPELINE},
        "checkpoint": {"store": f"file://{tmp_path / 'state'}" if store == "file" else f"kafka://{topics.state}",
                       "every_records": 3000, "every_seconds": 2},
        "telemetry": {"port": None, "log_level": "INFO"},
        "limits": {"batch_size": 500},
        "delivery": delivery,
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


class WorkerProcess:
    """``python -m worker run`` in its own process group; killed only by its pid."""

    def __init__(self, cfg: dict, tmp_path: Path, label: str = "w"):
        self.cfg_path = tmp_path / f"{label}-{uuid.uuid4().hex[:6]}.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp_path / f"{label}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "-c", str(self.cfg_path)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )
        return self

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; returns the exit code (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_for(self, text: str, timeout: float = 30.0) -> bool:
        """Wait until ``text`` appears in this run's log (bounded); False on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerProcess] = []

    def make(cfg: dict, label: str = "w") -> WorkerProcess:
        w = WorkerProcess(cfg, tmp_path, label)
        started.append(w)
        return w

    yield make
    for w in started:
        with contextlib.suppress(Exception):
            w.signal(signal.SIGCONT)
            w.kill()


def produce(broker, topic: str, records: list[dict], partitions: int) -> None:
    """Record i goes to partition i % partitions."""
    feed(broker.bootstrap, topic, iter(records), partitions=partitions)


def make_records(n: int, keys: int = 8, seed: int = 7) -> list[dict]:
    return list(synthetic(n, seed=seed, keys=keys))


def read_outputs(broker, topic: str, until, timeout: float = 90.0, committed: bool = True) -> list[dict]:
    """Read ``topic`` from the start (read_committed) until ``until(values)`` or ``timeout``."""
    c = Consumer({
        "bootstrap.servers": broker.bootstrap, "group.id": name("reader"), "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed" if committed else "read_uncommitted",
        "enable.partition.eof": False,
    })
    c.subscribe([topic])
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    out.append(orjson.loads(m.value()))
                elif m.error().code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(m.error())
            if until(out):
                break
    finally:
        c.close()
    return out


def plain_predictions(records: list[dict]) -> list:
    """The plain river loop: predict_proba_one -> arg-max, then learn_one."""
    model = build_model(ModelSettings(task="classification", pipeline=PIPELINE))
    preds = []
    for r in records:
        x = orjson.loads(orjson.dumps(r["x"]))
        proba = model.predict_proba_one(x)
        preds.append(max(proba, key=proba.get) if proba else None)
        model.learn_one(x, r["y"])
    return preds


def check_exactly_once(preds: list[dict], records: list[dict], input_topic: str, partitions: int = 2) -> None:
    """No duplicate, no missing prediction; each partition's predictions equal the plain loop."""
    seen: dict[tuple[str, int], dict] = {}
    dups = []
    for p in preds:
        k = (p["shard"], p["position"])
        if k in seen:
            dups.append(k)
        seen[k] = p
    assert not dups, f"{len(dups)} duplicate predictions, e.g. {dups[:5]}"
    for part in range(partitions):
        mine = records[part::partitions]
        shard = f"{input_topic}-{part}"
        got = [seen.get((shard, off)) for off in range(len(mine))]
        missing = [i for i, g in enumerate(got) if g is None]
        assert not missing, f"{shard}: {len(missing)} missing predictions, e.g. offsets {missing[:5]}"
        assert [g["id"] for g in got] == [r["id"] for r in mine]
        expected = plain_predictions(mine)
        diff = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g["prediction"] != e]
        assert not diff, f"{shard}: {len(diff)} predictions differ from the plain river loop, first at {diff[:5]}"
