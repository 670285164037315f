"""The abort path (failures injected inside transactions) and a broker restart."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.integration.conftest import (
    Topics,
    check_exactly_once,
    make_records,
    produce,
    read_outputs,
    worker_config,
)
from worker.checkpoint import open_store
from worker.config import load_settings
from worker.feeder import feed
from worker.learning import Engine
from worker.monitoring.telemetry import Telemetry
from worker.runtime import Runtime
from worker.transports.kafka import open_kafka

pytestmark = pytest.mark.integration


class FlakyProducer:
    """Delegates to the real producer; fails on chosen calls, inside open transactions."""

    def __init__(self, real, fail_produce_at: set[int], fail_offsets_at: set[int]):
        self.real = real
        self.produced = 0
        self.offsets = 0
        self.fail_produce_at = fail_produce_at
        self.fail_offsets_at = fail_offsets_at

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __len__(self) -> int:
        return len(self.real)

    def produce(self, *args, **kwargs):
        self.produced += 1
        if self.produced in self.fail_produce_at:
            raise RuntimeError(f"injected failure on produce #{self.produced}")
        return self.real.produce(*args, **kwargs)

    def send_offsets_to_transaction(self, *args, **kwargs):
        self.offsets += 1
        if self.offsets in self.fail_offsets_at:
            raise RuntimeError(f"injected failure on send_offsets #{self.offsets}")
        return self.real.send_offsets_to_transaction(*args, **kwargs)


def test_failures_inside_transactions_abort_and_rewind(kafka, tmp_path):
    topics = Topics(kafka)
    records = make_records(6000)
    produce(kafka, topics.input, records, partitions=2)
    settings = load_settings(data=worker_config(kafka, topics, tmp_path, store="file"), env={})
    tel = Telemetry()
    engine = Engine(settings, tel)
    source, sink = open_kafka(settings, tel)
    flaky = FlakyProducer(sink.producer, fail_produce_at={2500}, fail_offsets_at={4, 9})
    sink.producer = flaky
    new_producer = sink._new_producer

    def replacement():  # a producer re-created after a failed abort stays flaky
        flaky.real = new_producer()
        return flaky

    sink._new_producer = replacement
    runtime = Runtime(engine, source, sink, open_store(settings.checkpoint.store, settings))
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        preds = read_outputs(kafka, topics.predictions, lambda out: len(out) >= len(records), timeout=60)
    finally:
        runtime.stop()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert tel.registry.get_sample_value("worker_kafka_commits_total", {"outcome": "aborted"}) >= 2
    check_exactly_once(preds, records, topics.input)


def test_broker_restart_resumes_by_itself(kafka, workers, tmp_path):
    topics = Topics(kafka)
    records = make_records(6000)
    stop = threading.Event()
    feeder = threading.Thread(
        target=feed, args=(kafka.bootstrap, topics.input, iter(records)),
        kwargs={"rate": 600, "partitions": 2, "stop": stop}, daemon=True,
    )
    feeder.start()
    cfg = worker_config(kafka, topics, tmp_path)
    cfg["telemetry"]["port"] = 0
    w = workers(cfg, "w").start()
    assert w.wait_for("partitions assigned", 30), w.log()
    port = int(re.search(r"telemetry listening port=(\d+)", w.log()).group(1))
    statuses: list[int] = []
    watching = threading.Event()
    watching.set()

    def watch_readyz() -> None:
        while watching.is_set():
            try:
                statuses.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
            except OSError:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_readyz, daemon=True)
    watcher.start()
    time.sleep(2.0)
    kafka.restart(hard=True)  # SIGKILL the broker, start it again on the same log dir and ports
    feeder.join(timeout=60)
    preds = read_outputs(kafka, topics.predictions, lambda out: len(out) >= len(records), timeout=120)
    time.sleep(0.5)
    watching.clear()
    watcher.join(timeout=5)
    assert w.proc.poll() is None, "the worker died with the broker:\n" + w.log()
    assert w.stop() == 0, w.log()
    check_exactly_once(preds, records, topics.input)
    assert 503 in statuses, "/readyz never said 'not ready' while the broker was down"
    assert statuses[-1] == 200, "/readyz did not come back"
