"""Smoke tests of the test brokers in tests/brokers.py (Apache Kafka and Tansu).

Both brokers get a 2-partition topic, a transactional produce + commit and a
read_committed consumer; Apache Kafka additionally has to hide an aborted
transaction from read_committed readers (Tansu does not: see brokers.py).

A broker that cannot be started skips these tests, except under CI=true,
where it fails them. The brokers are the session's (tests/integration/conftest.py).
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

try:  # `tests` importable as a package (python -m pytest from the repo root)
    from tests.brokers import TANSU_CONSUMER_OVERRIDES, ApacheKafka, Tansu
except ImportError:  # rootdir-relative import (tests/ on sys.path)
    from brokers import TANSU_CONSUMER_OVERRIDES, ApacheKafka, Tansu

pytestmark = pytest.mark.integration

WAIT = 60.0  # bound on every consume loop, seconds


@pytest.fixture(params=["kafka", "tansu"])
def broker(request):
    return request.getfixturevalue(request.param)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _consumer(broker, group: str | None = None, **conf) -> Consumer:
    base = {
        "bootstrap.servers": broker.bootstrap,
        "group.id": group or _name("g"),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    }
    if isinstance(broker, Tansu):
        base.update(TANSU_CONSUMER_OVERRIDES)
    base.update(conf)
    return Consumer(base)


def _producer(broker, txid: str | None = None) -> Producer:
    conf = {"bootstrap.servers": broker.bootstrap, "linger.ms": 5}
    if txid:
        conf["transactional.id"] = txid
    return Producer(conf)


def _drain(consumer: Consumer, expected: int, settle: float = 1.0) -> list[tuple[int, str, str]]:
    """Poll until ``expected`` records arrived, then ``settle`` s more for extras."""
    got: list[tuple[int, str, str]] = []
    deadline = time.monotonic() + WAIT
    settle_until = None
    while time.monotonic() < deadline:
        if len(got) >= expected:
            settle_until = settle_until or time.monotonic() + settle
            if time.monotonic() >= settle_until:
                break
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                continue
            raise AssertionError(f"consumer error: {msg.error()}")
        got.append((msg.partition(), msg.key().decode(), msg.value().decode()))
    return got


def _read(broker, topic: str, expected: int, **conf) -> list[tuple[int, str, str]]:
    consumer = _consumer(broker, **conf)
    try:
        consumer.subscribe([topic])
        return _drain(consumer, expected)
    finally:
        consumer.close()


def _txn_batch(producer: Producer, topic: str, tag: str, n: int, commit: bool) -> None:
    producer.begin_transaction()
    for i in range(n):
        producer.produce(topic, key=f"k{i}", value=f"{tag}{i}")
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def test_transactional_commit_read_committed(broker):
    topic = _name("smoke")
    broker.create_topics([topic], partitions=2)
    producer = _producer(broker, txid=_name("tx"))
    producer.init_transactions(30)
    _txn_batch(producer, topic, "c", 10, commit=True)

    got = _read(broker, topic, 10)
    assert sorted(v for _, _, v in got) == sorted(f"c{i}" for i in range(10))
    assert {p for p, _, _ in got} == {0, 1}, "keys should spread over both partitions"
    # per-key order is kept and each key sits in one partition
    by_key: dict[str, set[int]] = {}
    for p, k, _ in got:
        by_key.setdefault(k, set()).add(p)
    assert all(len(ps) == 1 for ps in by_key.values())


def test_aborted_transaction_hidden_from_read_committed(kafka):
    topic = _name("abort")
    kafka.create_topics([topic], partitions=2)
    producer = _producer(kafka, txid=_name("tx"))
    producer.init_transactions(30)
    _txn_batch(producer, topic, "a", 6, commit=True)
    _txn_batch(producer, topic, "x", 6, commit=False)
    _txn_batch(producer, topic, "b", 6, commit=True)

    committed = sorted(v for _, _, v in _read(kafka, topic, 12))
    assert committed == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)])

    # the aborted records were really written: read_uncommitted sees them
    everything = sorted(v for _, _, v in _read(kafka, topic, 18, **{"isolation.level": "read_uncommitted"}))
    assert everything == sorted(committed + [f"x{i}" for i in range(6)])


def test_send_offsets_to_transaction(broker):
    """consume -> transform -> produce with the input offsets in the transaction."""
    src, dst, group = _name("in"), _name("out"), _name("g")
    broker.create_topics([src, dst], partitions=2)
    plain = _producer(broker)
    for i in range(8):
        plain.produce(src, key=f"k{i}", value=f"v{i}")
    assert plain.flush(30) == 0

    consumer = _consumer(broker, group=group)
    producer = _producer(broker, txid=_name("tx"))
    producer.init_transactions(30)
    try:
        consumer.subscribe([src])
        records = []
        deadline = time.monotonic() + WAIT
        while len(records) < 8 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                records.append(msg)
        assert len(records) == 8
        producer.begin_transaction()
        for msg in records:
            producer.produce(dst, key=msg.key(), value=msg.value().upper())
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), 30
        )
        producer.commit_transaction(30)
        committed = consumer.committed([TopicPartition(src, 0), TopicPartition(src, 1)], timeout=30)
    finally:
        consumer.close()

    ends = {tp.partition: tp.offset for tp in committed}
    per_partition = {0: 0, 1: 0}
    for msg in records:
        per_partition[msg.partition()] += 1
    assert ends == per_partition
    out = sorted(v for _, _, v in _read(broker, dst, 8))
    assert out == sorted(f"V{i}" for i in range(8))


def test_kafka_restart_keeps_data(kafka):
    topic = _name("durable")
    kafka.create_topics([topic], partitions=2)
    producer = _producer(kafka)
    for i in range(5):
        producer.produce(topic, key=f"k{i}", value=f"d{i}")
    assert producer.flush(30) == 0
    port = kafka.bootstrap
    kafka.restart()
    assert kafka.bootstrap == port
    assert sorted(v for _, _, v in _read(kafka, topic, 5)) == [f"d{i}" for i in range(5)]


def test_kafka_heap_grows_unless_fixed(tmp_path):
    """The tests' brokers start small; the benchmark's (fixed_heap) start at their maximum."""

    def heap_opts(**kw) -> list[str]:
        b = ApacheKafka(**kw)
        b.tmpdir = tmp_path
        return [o for o in b._jvm_opts() if o.startswith(("-Xms", "-Xmx"))]

    assert heap_opts() == ["-Xmx512m", "-Xms64m"]
    assert heap_opts(heap="1g", fixed_heap=True) == ["-Xmx1g", "-Xms1g"]


def test_broker_started_on_given_cpus():
    """``cpus`` confines the broker process and every thread it starts; the caller keeps its own CPUs."""
    mine = os.sched_getaffinity(0)
    one = {min(mine)}
    b = Tansu()
    b.cpus = one
    b.start()
    try:
        tasks = os.listdir(f"/proc/{b.pid}/task")
        assert len(tasks) > 1  # tokio's threads, started after the launch
        assert all(os.sched_getaffinity(int(t)) == one for t in tasks)
    finally:
        b.kill()
    assert os.sched_getaffinity(0) == mine
