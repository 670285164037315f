"""The worker on a real RabbitMQ node: shard queues, SIGKILL, failover and redelivery.

What is checked everywhere (:func:`check_learned_once`): every record has a prediction
(outputs are at-least-once: a crash may publish some twice), every prediction of a record
carries the same shard and position (positions grow in queue order), and its probabilities equal those of a plain river
loop over that shard's records in queue order. A record learned twice, or skipped, would
change every later probability of its shard, so the check fails on either.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid

import orjson
import pika
import pytest

from tests.integration.conftest import PIPELINE, make_records
from worker.config import ModelSettings
from worker.feeder import feed
from worker.models import build_model
from worker.monitoring.telemetry import Telemetry
from worker.records import Outputs
from worker.transports.rabbitmq import (
    RabbitConnection,
    RabbitSink,
    RabbitSource,
    RecordPublisher,
    declare_topology,
    shard_queues,
)

pytestmark = pytest.mark.integration


def rabbit_config(rabbitmq, tmp_path, exchange: str, shards: int = 2, store: bool = True, **over) -> dict:
    cfg = {
        "source": {"type": "rabbitmq", "rabbitmq": {"url": rabbitmq.url, "exchange": exchange, "shards": shards}},
        "outputs": {"predictions": f"{exchange}-predictions", "metrics": f"{exchange}-metrics",
                    "drift": f"{exchange}-drift", "dead_letter": f"{exchange}-dead"},
        "record": {"key": "key"},
        "model": {"task": "classification", "pipeline": PIPELINE},
        "checkpoint": {"store": f"file://{tmp_path / 'state'}" if store else None,
                       "every_records": 2000, "every_seconds": 1},
        "telemetry": {"port": None, "log_level": "INFO"},
        "limits": {"batch_size": 500},
        "delivery": "at_least_once",
    }
    cfg.update(over)
    return cfg


def publish(url: str, exchange: str, records: list[dict], rate: float | None = None) -> None:
    """Publish with confirms, routing key = the record key (the exchange hashes it to a shard queue)."""
    feed("", exchange, iter(records), rate=rate, producer=RecordPublisher(url))


def read_queue(url: str, queue: str, until, timeout: float = 90.0) -> list[dict]:
    """Take messages off ``queue`` until ``until(values)`` holds or ``timeout`` passes."""
    out: list[dict] = []
    conn = pika.BlockingConnection(pika.URLParameters(url))
    deadline = time.monotonic() + timeout
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        for method, _, body in ch.consume(queue, auto_ack=True, inactivity_timeout=0.5):
            if method is not None:
                out.append(orjson.loads(body))
            if until(out) or time.monotonic() > deadline:
                break
        ch.cancel()
    finally:
        conn.close()
    return out


def plain_probas(records: list[dict]) -> list[dict]:
    model = build_model(ModelSettings(task="classification", pipeline=PIPELINE))
    out = []
    for r in records:
        x = orjson.loads(orjson.dumps(r["x"]))
        out.append(model.predict_proba_one(x))
        model.learn_one(x, r["y"])
    return out


def check_learned_once(preds: list[dict], records: list[dict]) -> int:
    """No record without a prediction; each shard's probabilities equal a plain loop over its
    records in queue order. Returns how many predictions were duplicates."""
    by_id: dict = {}
    for p in preds:
        by_id.setdefault(p["id"], []).append(p)
    missing = [r["id"] for r in records if r["id"] not in by_id]
    assert not missing, f"{len(missing)} records without a prediction, e.g. {missing[:5]}"
    shards: dict[str, list[dict]] = {}
    for r in records:
        places = {(p["shard"], p["position"]) for p in by_id[r["id"]]}
        assert len(places) == 1, f"record {r['id']} predicted at several places: {places}"
        shards.setdefault(next(iter(places))[0], []).append(r)
    for shard, mine in shards.items():
        expected = plain_probas(mine)
        positions = [by_id[r["id"]][0]["position"] for r in mine]
        assert positions == sorted(positions), f"{shard}: positions out of queue order"
        for i, (r, proba) in enumerate(zip(mine, expected, strict=True)):
            for p in by_id[r["id"]]:
                got = {str(k).lower(): v for k, v in p["proba"].items()}
                want = {str(k).lower(): v for k, v in proba.items()}
                assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-9 for k in want), \
                    f"{shard} position {i}: {got} != plain loop {want} (a record learned twice or skipped before it)"
    return len(preds) - len(by_id)


def _exchange() -> str:
    return f"ev-{uuid.uuid4().hex[:8]}"


def test_predictions_equal_a_plain_loop_per_shard_queue(rabbitmq, workers, tmp_path):
    ex = _exchange()
    records = make_records(4000, keys=16)
    w = workers(rabbit_config(rabbitmq, tmp_path, ex)).start()
    assert w.wait_for("consuming from RabbitMQ", 30), w.log()
    publish(rabbitmq.url, ex, records)
    preds = read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len(out) >= len(records))
    assert w.stop() == 0, w.log()
    assert check_learned_once(preds, records) == 0
    assert len({p["shard"] for p in preds}) == 2, "the consistent-hash exchange spreads keys over both queues"
    queues = set(shard_queues(ex, 2))
    metrics = read_queue(rabbitmq.url, f"{ex}-metrics", lambda out: {m["shard"] for m in out} >= queues, timeout=10)
    assert {m["shard"] for m in metrics} == queues


def test_a_restart_continues_each_model_from_its_snapshot(rabbitmq, workers, tmp_path):
    ex = _exchange()
    records = make_records(3000, keys=8)
    cfg = rabbit_config(rabbitmq, tmp_path, ex)
    w = workers(cfg, "first").start()
    assert w.wait_for("consuming from RabbitMQ", 30), w.log()
    publish(rabbitmq.url, ex, records[:1500])
    preds = read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len(out) >= 1500)
    assert w.stop() == 0, w.log()
    w = workers(cfg, "second").start()
    assert w.wait_for("consuming from RabbitMQ", 30), w.log()
    publish(rabbitmq.url, ex, records[1500:])
    preds += read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len(out) >= 1500)
    assert w.stop() == 0, w.log()
    assert check_learned_once(preds, records) == 0  # a clean stop acks all it snapshotted: no duplicate


def test_each_record_is_learned_once_under_repeated_sigkill(rabbitmq, workers, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ex = _exchange()
    records = make_records(12000, keys=16)
    cfg = rabbit_config(rabbitmq, tmp_path, ex)
    declare_topology(rabbitmq.url, ex, shard_queues(ex, 2), [q for q in cfg["outputs"].values()])
    # (the feed outlasts the kills: a worker started once everything was learned and acked
    # would have nothing to do)
    feeder = threading.Thread(target=publish, args=(rabbitmq.url, ex, records), kwargs={"rate": 800}, daemon=True)
    feeder.start()
    for i in range(4):
        w = workers(cfg, f"w{i}").start()
        assert w.wait_for("consuming from RabbitMQ", 30), w.log()
        time.sleep(rng.uniform(0.3, 2.5))  # mid-batch, mid-snapshot, between a snapshot and its ack
        w.kill()
    feeder.join(timeout=60)
    assert not feeder.is_alive()
    last = workers(cfg, "final").start()
    preds = read_queue(rabbitmq.url, f"{ex}-predictions",
                       lambda out: len({p["id"] for p in out}) >= len(records), timeout=90)
    assert last.stop() == 0, last.log()
    try:
        dups = check_learned_once(preds, records)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    print(f"seed {seed}: {dups} duplicate predictions after 4 kills")


def test_a_standby_replica_takes_over_the_queues_of_one_that_died(rabbitmq, workers, tmp_path):
    ex = _exchange()
    records = make_records(6000, keys=16)
    cfg = rabbit_config(rabbitmq, tmp_path, ex)
    first = workers(cfg, "first").start()
    assert first.wait_for("consuming from RabbitMQ", 30), first.log()
    publish(rabbitmq.url, ex, records[:3000])
    assert first.wait_for("shard assigned", 30), first.log()
    standby = workers(cfg, "standby").start()  # single active consumer: it gets nothing while the first lives
    assert standby.wait_for("consuming from RabbitMQ", 30), standby.log()
    preds = read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len(out) >= 3000)
    assert "shard assigned" not in standby.log()
    first.signal(signal.SIGKILL)
    publish(rabbitmq.url, ex, records[3000:])
    assert standby.wait_for("shard assigned", 30), standby.log()
    preds += read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len({p["id"] for p in out}) >= 3000)
    assert standby.stop() == 0, standby.log()
    check_learned_once(preds, records)


def test_bad_records_become_dead_letters_and_a_broker_restart_is_ridden_out(rabbitmq, workers, tmp_path):
    """Poison records go to the dead-letter queue with their reason; the broker is killed and
    restarted mid-stream: the worker reconnects by itself, and every model still learns every
    record once."""
    ex = _exchange()
    records = make_records(6000, keys=16)
    cfg = rabbit_config(rabbitmq, tmp_path, ex)
    w = workers(cfg).start()
    assert w.wait_for("consuming from RabbitMQ", 30), w.log()
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    ch = conn.channel()
    ch.confirm_delivery()
    for bad in (b"{not json", b'{"id": "nan", "key": "k1", "x": {"a": NaN}, "y": 1}', b"[1, 2]"):
        ch.basic_publish(ex, "k1", bad)
    conn.close()
    publish(rabbitmq.url, ex, records[:3000])
    preds = read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len(out) >= 1000)
    rabbitmq.restart(hard=True)  # SIGKILL: unacked deliveries come back, the worker's connection drops
    assert w.wait_for("reconnecting", 30), w.log()
    publish(rabbitmq.url, ex, records[3000:])
    preds += read_queue(rabbitmq.url, f"{ex}-predictions",
                        lambda out: len({p["id"] for p in out} | {p["id"] for p in preds}) >= len(records))
    dead = read_queue(rabbitmq.url, f"{ex}-dead", lambda out: len(out) >= 3, timeout=20)
    assert w.stop() == 0, w.log()
    assert w.proc.returncode == 0
    check_learned_once(preds, records)
    assert sorted(d["reason"] for d in dead) == ["invalid_json", "non_finite_number", "not_an_object"], dead


def test_the_feeder_publishes_to_the_exchange_and_the_worker_learns_it(rabbitmq, workers, tmp_path):
    """`worker produce --rabbitmq` declares the exchange and its shard queues and publishes;
    a worker started afterwards takes what waits in the queues."""
    import subprocess
    import sys

    ex = _exchange()
    done = subprocess.run([sys.executable, "-m", "worker", "produce", "--rabbitmq", rabbitmq.url, "--topic", ex,
                           "--partitions", "2", "--records", "800", "--keys", "10"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published 800 records" in done.stderr
    w = workers(rabbit_config(rabbitmq, tmp_path, ex)).start()
    preds = read_queue(rabbitmq.url, f"{ex}-predictions", lambda out: len(out) >= 800)
    assert w.stop() == 0, w.log()
    assert sorted(p["id"] for p in preds) == list(range(800))
    assert {p["key"] for p in preds} == {f"k{i}" for i in range(10)}


class _Listener:
    """Stands in for the runtime: restores a shard from ``state`` at ``position``."""

    def __init__(self, source, sink, state: dict | None = None, position: int = 0):
        self.source, self.sink, self.state, self.position = source, sink, state, position
        self.assigned: list[str] = []

    def on_assign(self, shards):
        for s in shards:
            self.assigned.append(s)
            if self.state is not None:
                self.sink.restore(s, self.state)
            self.source.seek(s, self.position)

    def on_revoke(self, shards):
        pass

    def on_lost(self, shards):
        pass


def _open(url: str, queue: str, state: dict | None = None, position: int = 0):
    conn = RabbitConnection(url, [queue], prefetch=1000, fingerprints=True)
    sink = RabbitSink(conn, {"predictions": None}, ack_after_snapshot=True, commit_every=1.0)
    source = RabbitSource(conn, Telemetry())
    source.start(_Listener(source, sink, state, position))
    return source, sink


def _take(source, n: int, timeout: float = 20.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while sum(len(b.values) for b in got) < n and time.monotonic() < deadline:
        got += source.poll(1000, 0.2)
    return [(p, orjson.loads(v)["id"]) for b in got for p, v in zip(b.positions, b.values, strict=True)]


@pytest.mark.parametrize("ack_applied", [False, True])
def test_redelivered_records_the_snapshot_has_are_not_taken_again(rabbitmq, ack_applied):
    """A snapshot at position 60 is durable; the worker dies before (False) or after (True) its
    ack reaches the broker. Either way the next owner of the queue takes records 60.. at
    positions 60.., and never records 0..59 again."""
    ex = _exchange()
    queue = shard_queues(ex, 1)[0]
    declare_topology(rabbitmq.url, ex, [queue], [])
    publish(rabbitmq.url, ex, [{"id": i, "key": f"k{i}", "x": {"a": i}, "y": 0} for i in range(100)])
    source, sink = _open(rabbitmq.url, queue)
    assert _take(source, 100) == [(i, i) for i in range(100)]
    sink.publish(Outputs())
    sink.commit({queue: 60})
    state = sink.checkpoint_state(queue, 60)  # the snapshot at 60 ...
    assert len(state["window"]) == 60
    if ack_applied:
        sink.snapshotted(queue, 60)  # ... and its ack
        deadline = time.monotonic() + 10
        while not source.conn.queues[queue].receipts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.conn.queues[queue].receipts, "the ack's receipt never came"
    source.close()  # the broker requeues every unacked delivery (redelivered)
    source, sink = _open(rabbitmq.url, queue, state, 60)
    try:
        assert _take(source, 40) == [(i, i) for i in range(60, 100)]
        assert source.poll(1000, 0.5) == []
    finally:
        source.close()
    # ... and the records the window recognised were acked: a third owner starts at 60
    source, sink = _open(rabbitmq.url, queue, None, 60)
    try:
        assert _take(source, 40)[:1] == [(60, 60)]
    finally:
        source.close()


def test_the_backlog_of_an_owned_queue_is_sampled(rabbitmq):
    """worker_rabbitmq_ready_messages: the messages the broker has not delivered yet. With a
    prefetch of 10 and nothing acked, 10 of 100 are out and 90 wait in the queue."""
    ex = _exchange()
    queue = shard_queues(ex, 1)[0]
    declare_topology(rabbitmq.url, ex, [queue], [])
    publish(rabbitmq.url, ex, [{"id": i, "key": f"k{i}", "x": {"a": i}, "y": 0} for i in range(100)])
    conn = RabbitConnection(rabbitmq.url, [queue], prefetch=10, fingerprints=False)
    sink = RabbitSink(conn, {"predictions": None}, ack_after_snapshot=True, commit_every=1.0)
    telemetry = Telemetry()
    source = RabbitSource(conn, telemetry, ready_every=0.1)
    source.start(_Listener(source, sink))

    def ready() -> float | None:
        return telemetry.registry.get_sample_value("worker_rabbitmq_ready_messages", {"shard": queue})

    try:
        assert _take(source, 10) == [(i, i) for i in range(10)]
        deadline = time.monotonic() + 20
        while ready() != 90 and time.monotonic() < deadline:
            assert source.poll(1000, 0.1) == []  # (nothing acked: no more deliveries)
        assert ready() == 90
        telemetry.forget_shard(queue)  # (what the runtime does when the shard is lost)
        assert ready() is None
    finally:
        source.close()
