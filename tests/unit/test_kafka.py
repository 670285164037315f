"""The Kafka transport and store against librdkafka's mock cluster (no broker process),
and the runtime's rewind path with in-memory stand-ins.

The mock cluster (``test.mock.num.brokers``) speaks the protocol, transactions included,
but does not apply transactional offset commits to the group, so exactly-once itself is
judged in tests/integration on Apache Kafka.
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from worker.checkpoint.file import FileStore
from worker.checkpoint.kafka import KafkaStore
from worker.config import load_settings
from worker.errors import CheckpointStoreError, FencedError
from worker.learning import Engine
from worker.records import Batch, Outputs
from worker.runtime import Runtime
from worker.state import loads_snapshot
from worker.transports.base import Rewind
from worker.transports.kafka import (
    KafkaSink,
    KafkaSource,
    OutputReader,
    RecordProducer,
    client_configs,
    open_kafka,
    parse_shard,
    shard_name,
)

QUIET = {"log_level": 0}


@pytest.fixture(scope="module")
def mock_cluster():
    """A one-broker mock cluster; its address is what other clients bootstrap from."""
    owner = Producer({"bootstrap.servers": "unused", "test.mock.num.brokers": 1, **QUIET})
    md = owner.list_topics(timeout=10)
    yield ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
    owner.flush(1)


def settings_for(bootstrap: str, tmp_path, delivery: str = "exactly_once", tag: str = "", **kafka):
    return load_settings(
        data={
            "source": {"type": "kafka", "kafka": {
                "bootstrap_servers": bootstrap, "topics": kafka.pop("topics", ["in"]), "group_id": f"g{tag}",
                "config": QUIET, "transactional_id": "t-1", **kafka,
            }},
            "outputs": {"predictions": f"pred{tag}", "drift": f"drift{tag}", "metrics": None, "dead_letter": f"dead{tag}"},
            "record": {"key": "key"},
            "checkpoint": {"store": f"file://{tmp_path / 'state'}"},
            "telemetry": {"port": None},
            "delivery": delivery,
        },
        env={},
    )


def test_shard_names_round_trip():
    assert shard_name("my-topic", 3) == "my-topic-3"
    assert parse_shard("my-topic-3") == ("my-topic", 3)


def test_client_configs_render_delivery_modes(tmp_path):
    consumer, producer = client_configs(settings_for("b:9092", tmp_path, producer={"linger.ms": 5}))
    assert consumer["isolation.level"] == "read_committed"
    assert consumer["partition.assignment.strategy"] == "cooperative-sticky"
    assert consumer["enable.auto.commit"] is False
    assert producer["transactional.id"] == "t-1" and producer["linger.ms"] == 5
    _, producer = client_configs(settings_for("b:9092", tmp_path, delivery="at_least_once"))
    assert "transactional.id" not in producer and producer["enable.idempotence"] is True


def _run_until(runtime: Runtime, done, timeout: float = 30.0) -> None:
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)
    runtime.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_worker_round_trip_on_the_mock_cluster(mock_cluster, tmp_path, delivery):
    topic = f"in-{delivery}"
    feeder = RecordProducer(mock_cluster, **QUIET)
    for i in range(300):
        feeder.send(topic, orjson.dumps({"id": i, "key": f"k{i % 3}", "x": {"a": i % 7}, "y": i % 2}), partition=i % 2)
    feeder.send(topic, b"{broken", partition=0)
    feeder.flush()
    settings = settings_for(mock_cluster, tmp_path, delivery, tag=delivery, topics=[topic],
                            consumer={"session.timeout.ms": 6000})
    engine = Engine(settings)
    source, sink = open_kafka(settings, engine.telemetry)
    runtime = Runtime(engine, source, sink, FileStore(tmp_path / "state"))
    kinds = {"predictions": f"pred{delivery}", "dead_letter": f"dead{delivery}"}
    reader = OutputReader(mock_cluster, list(kinds.values()), **QUIET)
    got = Outputs()

    def done() -> bool:
        got.extend(reader.poll(0.1, kinds))
        return len(got.predictions) >= 300 and len(got.dead_letters) >= 1

    try:
        _run_until(runtime, done)
    finally:
        reader.close()
    preds = [orjson.loads(v) for _, v in got.predictions]
    assert sorted(p["id"] for p in preds) == list(range(300))
    assert all(k == p["key"].encode() for (k, _), p in zip(got.predictions, preds, strict=True))
    assert orjson.loads(got.dead_letters[0][1])["reason"]
    assert engine.telemetry.registry.get_sample_value("worker_kafka_commits_total", {"outcome": "committed"}) >= 1


class _FencingProducer:
    def __init__(self, code: int, fatal: bool = False):
        self.err = KafkaError(code, "injected", fatal=fatal)
        self.aborted = 0

    def __len__(self) -> int:
        return 0

    def begin_transaction(self) -> None:
        return None

    def send_offsets_to_transaction(self, *a) -> None:
        raise KafkaException(self.err)

    def commit_transaction(self, *a) -> None:
        raise KafkaException(self.err)

    def abort_transaction(self, *a) -> None:
        self.aborted += 1

    def purge(self) -> None:
        return None


class _Source:
    def group_metadata(self):
        return None

    def lag(self, shard, position):
        return None


@pytest.mark.parametrize(
    ("code", "fatal", "raised"),
    [(KafkaError._FENCED, True, FencedError), (KafkaError.PRODUCER_FENCED, False, FencedError),
     (KafkaError.INVALID_PRODUCER_EPOCH, False, FencedError), (KafkaError._STATE, False, Rewind)],
)
def test_commit_failures_are_translated(mock_cluster, code, fatal, raised):
    from worker.monitoring.telemetry import Telemetry

    tel = Telemetry()
    sink = KafkaSink({"bootstrap.servers": mock_cluster, "transactional.id": f"f-{code}", **QUIET},
                     {"predictions": "pred"}, _Source(), tel)
    real = sink.producer
    fake = _FencingProducer(code, fatal)
    sink.producer = fake
    with pytest.raises(raised):
        sink.commit({"in-0": 5})
    if raised is FencedError:
        assert sink.producer is not fake, "a fenced producer must be replaced"
        assert tel.registry.get_sample_value("worker_kafka_commits_total", {"outcome": "fenced"}) == 1
    else:
        assert fake.aborted == 1 and sink.producer is fake
    real.flush(1)


@pytest.mark.parametrize(
    ("code", "fatal", "raised"),
    [(KafkaError.PRODUCER_FENCED, False, FencedError), (KafkaError._STATE, False, Rewind)],
)
@pytest.mark.parametrize("then", ["publish", "commit", "abort"])
def test_a_failed_background_commit_is_raised_by_the_next_call(mock_cluster, code, fatal, raised, then):
    from worker.monitoring.telemetry import Telemetry

    tel = Telemetry()
    sink = KafkaSink({"bootstrap.servers": mock_cluster, "transactional.id": f"b-{code}-{then}", **QUIET},
                     {"predictions": "pred"}, _Source(), tel)
    real = sink.producer
    fake = _FencingProducer(code, fatal)
    sink.producer = fake
    sink.commit({"in-0": 5}, wait=False)  # returns at once: the failure is the next call's
    if then == "abort":  # partitions lost: the failed commit's transaction is gone, say so
        assert sink.abort() is True
    else:
        with pytest.raises(raised):
            sink.publish(Outputs()) if then == "publish" else sink.commit({"in-0": 5})
    if raised is FencedError:
        assert sink.producer is not fake
    else:
        assert fake.aborted == 1
    assert sink._committed == {}, "a failed commit must not count as committed"
    assert tel.registry.get_sample_value("worker_kafka_commits_total", {"outcome": "committed"}) in (None, 0.0)
    real.flush(1)


class _GatedProducer(_FencingProducer):
    """Commits only once the test opens the gate; records what was called, in order."""

    def __init__(self):
        super().__init__(KafkaError.NO_ERROR)
        self.gate = threading.Event()
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets, *a) -> None:
        self.calls.append(f"offsets {[(tp.partition, tp.offset) for tp in offsets]}")

    def commit_transaction(self, *a) -> None:
        assert self.gate.wait(10)
        self.calls.append("commit")

    def produce(self, topic, value, key=None, partition=-1, on_delivery=None):  # (as Producer.produce)
        self.calls.append(f"produce {value.decode()}")

    def poll(self, timeout=0):
        return 0


def test_the_periodic_exactly_once_commit_overlaps_and_the_next_publish_waits_for_it(mock_cluster):
    from worker.monitoring.telemetry import Telemetry

    tel = Telemetry()
    sink = KafkaSink({"bootstrap.servers": mock_cluster, "transactional.id": "gated", **QUIET},
                     {"predictions": "pred"}, _Source(), tel)
    real = sink.producer
    sink.producer = fake = _GatedProducer()
    sink.publish(Outputs(predictions=[(None, b"a")]))
    sink.commit({"in-0": 1}, wait=False)
    assert sink._committed == {}  # in flight: not counted yet
    published = threading.Thread(target=sink.publish, args=(Outputs(predictions=[(None, b"b")]),))
    published.start()
    published.join(0.3)
    assert published.is_alive(), "the next transaction must not start before the commit in flight ends"
    assert "produce b" not in fake.calls
    fake.gate.set()
    published.join(10)
    assert fake.calls == ["begin", "produce a", "offsets [(0, 1)]", "commit", "begin", "produce b"]
    assert sink._committed == {"in-0": 1}
    assert tel.registry.get_sample_value("worker_kafka_commits_total", {"outcome": "committed"}) == 1
    sink.commit({"in-0": 2})  # a waiting commit is done on return
    assert fake.calls[-2:] == ["offsets [(0, 2)]", "commit"] and sink._committed == {"in-0": 2}
    real.flush(1)


class _HeldProducer:
    """Holds every output until the test acknowledges it (or fails it): delivery on demand."""

    def __init__(self):
        self.held: list = []

    def produce(self, topic, value, key=None, partition=-1, on_delivery=None):  # (as Producer.produce)
        self.held.append((value, on_delivery))

    def deliver(self, values, err=None):
        for item in [h for h in self.held if h[0] in values]:
            self.held.remove(item)
            item[1](err, None)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=None):
        self.deliver([v for v, _ in self.held])
        return 0

    def __len__(self):
        return len(self.held)


class _OffsetSource(_Source):
    def __init__(self):
        self.commits: list = []
        self.commit_failed = False

    def commit_offsets(self, offsets, wait=True):
        self.commits.append(({shard_name(tp.topic, tp.partition): tp.offset for tp in offsets}, wait))


def _alo_sink(mock_cluster):
    from worker.monitoring.telemetry import Telemetry

    source = _OffsetSource()
    sink = KafkaSink({"bootstrap.servers": mock_cluster, **QUIET}, {"predictions": "pred"}, source, Telemetry(),
                     exactly_once=False)
    sink.producer.flush(1)
    sink.producer = _HeldProducer()
    return sink, source


def test_at_least_once_commits_only_acknowledged_outputs_in_order(mock_cluster):
    sink, source = _alo_sink(mock_cluster)
    sink.publish(Outputs(predictions=[(None, b"a1"), (None, b"a2")]))
    sink.commit({"in-0": 2}, wait=False)  # epoch A sealed at 2, nothing acknowledged: nothing committed
    sink.publish(Outputs(predictions=[(None, b"b1")]))
    sink.commit({"in-0": 3}, wait=False)  # epoch B sealed at 3
    assert source.commits == []
    sink.producer.deliver([b"b1"])  # B acknowledged, A not: committing 3 would cover a1, a2
    sink.commit({"in-0": 3}, wait=False)
    assert source.commits == []
    sink.producer.deliver([b"a1", b"a2"])
    sink.commit({"in-0": 3}, wait=False)
    assert source.commits == [({"in-0": 3}, False)]  # both epochs: the latest position, asynchronously
    sink.publish(Outputs(predictions=[(None, b"c1")]))
    sink.commit({"in-0": 4})  # waits: flushed, acknowledged and committed on return
    assert source.commits[-1] == ({"in-0": 4}, True) and len(sink.producer) == 0


def test_at_least_once_delivery_error_rewinds_and_commits_nothing_after_it(mock_cluster):
    sink, source = _alo_sink(mock_cluster)
    sink.publish(Outputs(predictions=[(None, b"a1")]))
    sink.commit({"in-0": 1}, wait=False)
    sink.publish(Outputs(predictions=[(None, b"b1")]))
    sink.commit({"in-0": 2}, wait=False)
    sink.producer.deliver([b"b1"])
    sink.producer.deliver([b"a1"], err=KafkaError(KafkaError._MSG_TIMED_OUT))
    with pytest.raises(Rewind, match="not delivered"):
        sink.commit({"in-0": 2}, wait=False)
    assert source.commits == []
    sink.publish(Outputs(predictions=[(None, b"a1")]))  # the replay
    sink.commit({"in-0": 2})
    assert source.commits == [({"in-0": 2}, True)]


def test_at_least_once_commits_again_after_a_fatal_producer_error(mock_cluster):
    """The producer is re-created; what the old one held is replayed, not waited for."""
    sink, source = _alo_sink(mock_cluster)
    sink.publish(Outputs(predictions=[(None, b"a1"), (None, b"a2")]))
    sink.commit({"in-0": 2}, wait=False)  # sealed, never acknowledged: the old producer is gone
    with pytest.raises(Rewind, match="re-created"):
        sink._failed(KafkaException(KafkaError(KafkaError._FATAL, "injected", fatal=True)), "produce")
    sink.publish(Outputs(predictions=[(None, b"a1"), (None, b"a2")]))  # the replay, on the new producer
    sink.commit({"in-0": 2})
    assert source.commits == [({"in-0": 2}, True)]


class _RefusingConsumer:
    def __init__(self):
        self.calls = 0

    def commit(self, offsets=None, asynchronous=True):
        self.calls += 1
        raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "injected"))


def test_at_least_once_a_refused_offset_commit_is_sent_again_not_fatal():
    from worker.monitoring.telemetry import Telemetry

    source = KafkaSource({}, ["in"], Telemetry())
    source.consumer = _RefusingConsumer()
    source.commit_offsets([TopicPartition("in", 0, 5)], wait=True)  # logged, not raised
    assert source.commit_failed and source.consumer.calls == 1  # (not retriable: no retry)


@pytest.mark.parametrize("exactly_once", [True, False])
def test_an_output_too_large_for_the_producer_becomes_a_short_dead_letter(mock_cluster, exactly_once):
    """It would fail again on every replay (a rewind loop, or a worker that never commits)."""
    from worker.monitoring.telemetry import Telemetry

    tag = f"big-{exactly_once}"
    kinds = {"predictions": f"{tag}-pred", "dead_letter": f"{tag}-dl"}
    conf = {"bootstrap.servers": mock_cluster, "message.max.bytes": 10_000, **QUIET}
    if exactly_once:
        conf["transactional.id"] = tag
    source = _OffsetSource()
    source.group_metadata = lambda: None
    sink = KafkaSink(conf, kinds, source, Telemetry(), exactly_once=exactly_once)
    reader = OutputReader(mock_cluster, list(kinds.values()), **QUIET)
    sink.publish(Outputs(predictions=[(b"k", b'"' + b"x" * 20_000 + b'"'), (None, b'{"ok":1}')]))
    sink.commit({"in-0": 2} if not exactly_once else {})
    got = Outputs()
    deadline = time.monotonic() + 20
    while (not got.predictions or not got.dead_letters) and time.monotonic() < deadline:
        got.extend(reader.poll(0.2, kinds))
    assert [v for _, v in got.predictions] == [b'{"ok":1}']
    ((key, value),) = got.dead_letters
    letter = orjson.loads(value)
    assert key == b"k" and (letter["reason"], letter["output"], letter["bytes"]) == ("output_too_large", kinds["predictions"], 20_002)
    assert len(letter["head"]) == 1024
    assert sink.telemetry.dead_letters.labels(reason="output_too_large")._value.get() == 1
    if not exactly_once:
        assert source.commits == [({"in-0": 2}, True)]
    sink.close()


class _RecordingListener:
    """An assignment listener that appends ``(kind, shards)`` to ``calls``; ``revoke_error`` is raised by each revoke."""

    def __init__(self, calls: list, revoke_error: Exception | None = None):
        self.calls, self.revoke_error = calls, revoke_error

    def on_assign(self, shards):
        self.calls.append(("assign", shards))

    def on_revoke(self, shards):
        self.calls.append(("revoke", shards))
        if self.revoke_error is not None:
            raise self.revoke_error

    def on_lost(self, shards):
        self.calls.append(("lost", shards))


def test_callbacks_after_a_failed_one_set_up_assigned_shards_and_commit_nothing_for_revoked_ones():
    """A revoke that raised (its commit failed) and a later assignment in the same poll: the new
    shards must still reach the runtime (the rewind then covers them), and a revoke must not commit."""
    from worker.monitoring.telemetry import Telemetry

    calls: list = []
    source = KafkaSource({}, ["in"], Telemetry())
    source._listener = _RecordingListener(calls, revoke_error=Rewind("injected: the commit at the revoke failed"))
    source._run_listener("on_revoke", [TopicPartition("in", 0)])
    source._run_listener("on_assign", [TopicPartition("in", 1)])
    source._run_listener("on_revoke", [TopicPartition("in", 2)])
    assert calls == [("revoke", ["in-0"]), ("assign", ["in-1"]), ("lost", ["in-2"])]
    assert str(source._callback_error) == "injected: the commit at the revoke failed"  # the first one is raised


def test_an_assignment_met_while_closing_is_handed_back_without_a_broker_call():
    """A partner leaving the group while this consumer closes: librdkafka serves the assignment
    from inside close(). Asking for its committed offsets there waited out the whole timeout
    (a stop held 30 s and more, seen in CI); the shards must not be taken up either."""
    from worker.monitoring.telemetry import Telemetry

    calls: list = []

    class ClosingConsumer:
        def committed(self, partitions, timeout=None):
            calls.append(("committed", timeout))
            raise AssertionError("a broker call from inside close()")

        def incremental_assign(self, partitions):
            calls.append(("incremental_assign", [(tp.topic, tp.partition) for tp in partitions]))

        def close(self):  # as librdkafka does when an assignment arrives during the close
            source._on_assign(self, [TopicPartition("in", 0)])

    source = KafkaSource({}, ["in"], Telemetry())
    source._listener = _RecordingListener(calls)
    source.consumer = ClosingConsumer()
    source.close()
    assert calls == [("incremental_assign", [("in", 0)])]
    assert source._callback_error is None and source.consumer is None


def test_a_lost_asynchronous_commit_is_sent_again(mock_cluster):
    sink, source = _alo_sink(mock_cluster)
    sink.publish(Outputs(predictions=[(None, b"a1")]))
    sink.commit({"in-0": 1})
    source.commit_failed = True  # (set by the consumer's on_commit callback)
    sink.commit({"in-0": 1})  # unchanged position, but its last commit may not have landed
    assert source.commits == [({"in-0": 1}, True), ({"in-0": 1}, True)] and not source.commit_failed


def test_kafka_store_chunks_and_never_loads_a_torn_set(mock_cluster):
    store = KafkaStore("state-topic", mock_cluster, prefix="g", conf=QUIET, chunk_bytes=1000, create=False)
    blob = bytes(range(256)) * 20  # 5 chunks
    store.save("in-0", blob)
    store.save("in-1", b"other")
    assert store.load("in-0") == blob and store.load("in-2") is None
    # a crash mid-save: new chunks written, manifest never written -> the old snapshot stays
    store.log.append([(b"g/in-0/deadbeef/0", b"partial")])
    reader = KafkaStore("state-topic", mock_cluster, prefix="g", conf=QUIET, chunk_bytes=1000, create=False)
    assert reader.load("in-0") == blob and reader.load("in-1") == b"other"
    store.save("in-0", b"newer")
    assert reader.load("in-0") == b"newer"
    store.close()
    reader.close()


@pytest.mark.parametrize("manifest", [b"not json", b'{"id": "x"}', b'{"id": "x", "chunks": "many", "length": 1, "sha256": ""}'])
def test_an_unreadable_kafka_store_manifest_is_a_store_error(mock_cluster, manifest):
    from worker.errors import CheckpointStoreError

    topic = f"state-bad-{len(manifest)}"
    store = KafkaStore(topic, mock_cluster, prefix="g", conf=QUIET, create=False)
    store.log.append([(b"g/in-0", manifest)])
    with pytest.raises(CheckpointStoreError, match="manifest of shard in-0"):
        store.load("in-0")
    store.close()


def test_creating_topics_on_a_broker_that_does_not_answer_is_a_transport_error():
    from worker.errors import TransportError
    from worker.transports.kafka import create_topics

    # (the whole call times out, or the topic's own future does first: either is this error)
    with pytest.raises(TransportError, match="cannot create topic"):
        create_topics("127.0.0.1:9", ["t"], timeout=1.0, conf=QUIET)


# -- the runtime's abort path, with in-memory stand-ins ----------------------------------------
class ListSource:
    """Two shards of labelled records, one batch of ``size`` per poll, seekable."""

    def __init__(self, n: int, size: int = 50):
        self.records = {
            f"s{p}": [orjson.dumps({"id": f"{p}-{i}", "x": {"a": (i * 7 + p) % 11}, "y": i % 2}) for i in range(n)]
            for p in (0, 1)
        }
        self.pos = {s: 0 for s in self.records}
        self.committed_pos: dict[str, int] = {}
        self.size = size
        self.exhausted = False
        self._turn = 0

    def start(self, listener) -> None:
        listener.on_assign(list(self.records))

    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        shard = list(self.records)[self._turn % 2]
        self._turn += 1
        p = self.pos[shard]
        vals = self.records[shard][p : p + self.size]
        if not vals:
            self.exhausted = all(self.pos[s] >= len(r) for s, r in self.records.items())
            return []
        self.pos[shard] = p + len(vals)
        return [Batch(shard, vals, list(range(p, p + len(vals))))]

    def seek(self, shard: str, position: int) -> None:
        self.pos[shard] = position

    def committed(self, shard: str) -> int | None:
        return self.committed_pos.get(shard)

    def close(self) -> None:
        return None


class TxnSink:
    """Buffers outputs like a transaction; the 3rd and 5th commits fail (aborting the buffer)."""

    def __init__(self, source: ListSource):
        self.source = source
        self.pending: list = []
        self.visible: list = []
        self.commits = 0
        self.commit_every = 0.0

    def publish(self, outputs: Outputs) -> None:
        self.pending.extend(orjson.loads(v) for _, v in outputs.predictions)

    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        self.commits += 1
        if self.commits in (3, 5):
            self.pending = []
            raise Rewind("injected")
        self.visible.extend(self.pending)
        self.pending = []
        self.source.committed_pos.update(positions)

    def checkpoint_state(self, shard: str, position: int = 0) -> dict:
        return {}

    def restore(self, shard: str, state: dict) -> None:
        return None

    def close(self) -> None:
        return None


def test_runtime_rewinds_after_an_aborted_commit(tmp_path):
    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 120},
                                   "telemetry": {"port": None}}, env={})
    source = ListSource(400)
    sink = TxnSink(source)
    runtime = Runtime(Engine(settings), source, sink, FileStore(tmp_path))
    assert runtime.run() == 0
    ids = [p["id"] for p in sink.visible]
    assert len(ids) == len(set(ids)) == 800, "every record published exactly once"
    # and the models learned each record once: same predictions as an uninterrupted run
    clean_source = ListSource(400)
    clean = TxnSink(clean_source)
    clean.commits = 100  # no failures
    Runtime(Engine(settings), clean_source, clean, FileStore(tmp_path / "clean")).run()
    by_id = {p["id"]: p["prediction"] for p in clean.visible}
    assert all(by_id[p["id"]] == p["prediction"] for p in sink.visible)


class _RevokingAtClose(ListSource):
    """A source whose close() serves a last revoke through the listener, as consumer.close() does."""

    def start(self, listener) -> None:
        self.listener = listener
        super().start(listener)

    def close(self) -> None:
        self.listener.on_revoke(list(self.records))


class _FailingStore(FileStore):
    def __init__(self, path, fail_at: int):
        super().__init__(path)
        self.saves, self.fail_at = 0, fail_at

    def save(self, shard, blob) -> None:
        self.saves += 1
        if self.saves == self.fail_at:
            raise CheckpointStoreError("disk full (injected)")
        super().save(shard, blob)


def test_the_revoke_at_the_close_does_not_snapshot_again_what_the_stop_just_did(tmp_path):
    """A stop checkpoints every shard, then leaving the group revokes them: one snapshot each, not two."""
    saves: list = []

    class Store(FileStore):
        def save(self, shard, blob) -> None:
            saves.append(shard)
            super().save(shard, blob)

    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 10**6},
                                   "telemetry": {"port": None}}, env={})
    source = _RevokingAtClose(100)
    sink = TxnSink(source)
    sink.commits = 100
    assert Runtime(Engine(settings), source, sink, Store(tmp_path)).run() == 0
    assert sorted(saves) == ["s0", "s0", "s1", "s1"]  # at the assignment, at the stop


def test_a_loop_that_died_commits_nothing_at_the_last_revoke(tmp_path, late_learners):
    """A snapshot between polls fails after its poll was collected and before it was published:
    the revoke at the source's close must not commit past that unpublished poll."""
    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 120},
                                   "limits": {"polls_in_flight": 3}, "telemetry": {"port": None}}, env={})
    engine = Engine(settings)
    source = _RevokingAtClose(400)
    sink = TxnSink(source)
    sink.commits = 100  # no injected commit failures
    runtime = Runtime(engine, source, sink, _FailingStore(tmp_path, fail_at=3), learners=late_learners(engine.learner))
    with pytest.raises(CheckpointStoreError):  # saves 1 and 2: the first snapshots at assignment
        runtime.run()
    for p, shard in enumerate(("s0", "s1")):
        published = {int(r["id"].split("-")[1]) for r in sink.visible if r["id"].startswith(f"{p}-")}
        assert set(range(source.committed_pos.get(shard, 0))) <= published, shard


class _AlwaysFenced(TxnSink):
    """Every background commit fails, as a producer fenced by another one with its transactional
    id would; the failure surfaces at the next publish."""

    def __init__(self, source: ListSource):
        super().__init__(source)
        self.failed = False
        self.fences = 0

    def publish(self, outputs: Outputs) -> None:
        if self.failed:
            self.failed, self.pending = False, []
            self.fences += 1
            raise FencedError("producer fenced on commit (injected)")
        super().publish(outputs)

    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        if wait:
            super().commit(positions, wait)
        else:
            self.failed = True


def test_fenced_again_and_again_in_the_background_the_worker_gives_up(tmp_path):
    """Two workers sharing a transactional id fence each other forever: after four fences in a
    row with no commit in between, the worker exits (its orchestrator can tell)."""
    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 10**9,
                                                  "every_seconds": 10**6},
                                   "telemetry": {"port": None}, "learner": "inline"}, env={})
    source = ListSource(10**5, size=20)
    sink = _AlwaysFenced(source)
    runtime = Runtime(Engine(settings), source, sink, FileStore(tmp_path))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["rc"] = runtime.run()
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcome["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # (bounded: stop it either way)
        runtime.stop()
        thread.join(10)
    assert isinstance(outcome.get("exc"), FencedError), outcome
    assert sink.fences == 4


class _RestoreFailsOnce(TxnSink):
    """restore() raises as the Kafka sink's does when the commit in flight failed (its outputs aborted)."""

    def restore(self, shard: str, state: dict) -> None:
        if not getattr(self, "failed", False):
            self.failed = True
            self.pending = []
            raise Rewind("injected: the background commit failed")


def test_a_failed_commit_met_during_an_assignment_rewinds_every_shard(tmp_path):
    """Every shard of the assignment is set up (none left unowned), then all rewind."""
    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 120},
                                   "telemetry": {"port": None}}, env={})
    first = ListSource(400)
    sink = TxnSink(first)
    sink.commits = 100  # no injected commit failures
    Runtime(Engine(settings), first, sink, FileStore(tmp_path)).run()  # snapshots of both shards
    source = ListSource(600)
    source.committed_pos = dict(first.committed_pos)
    sink = _RestoreFailsOnce(source)
    sink.commits = 100
    runtime = Runtime(Engine(settings), source, sink, FileStore(tmp_path))
    assert runtime.run() == 0
    ids = [r["id"] for r in sink.visible]
    assert sorted(ids) == sorted(f"{p}-{i}" for p in (0, 1) for i in range(400, 600))  # each once


class LosingSource(ListSource):
    """Loses shard s1 once, at the first poll where a snapshot's learner half is asked for
    behind polls not yet published (the worker's half not taken yet)."""

    def __init__(self, n: int, sink: "AbortingSink"):
        super().__init__(n)
        self.sink = sink
        self.lost_while_queued = False

    def start(self, listener) -> None:
        self.runtime = listener
        super().start(listener)

    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        rt = self.runtime
        asked = any(dump for _, dump in rt._inflight)
        if not self.lost_while_queued and asked and rt._parts is None and len(rt._inflight) > 1:
            self.lost_while_queued = True
            self.sink.in_callback = True
            rt.on_lost(["s1"])
            self.sink.in_callback = False
            return []
        return super().poll(max_records, timeout)


class AbortingSink(TxnSink):
    """Never fails a commit; ``abort`` drops the open transaction; commits inside a callback are counted."""

    def __init__(self, source):
        super().__init__(source)
        self.commits = 100
        self.in_callback = False
        self.commits_in_callback = 0

    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        self.commits_in_callback += self.in_callback
        super().commit(positions, wait)

    def abort(self) -> bool:
        self.pending = []
        return True


def test_a_lost_partition_never_commits_the_open_transaction_with_polls_in_flight(tmp_path, late_learners):
    """With three polls in flight and an overlapped snapshot queued, losing a partition drains
    the other shards' polls without committing (the open transaction holds the lost shard's
    outputs: it is aborted, and every shard rewinds)."""
    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 120},
                                   "limits": {"polls_in_flight": 3}, "telemetry": {"port": None}}, env={})
    engine = Engine(settings)
    sink = AbortingSink(None)
    source = LosingSource(400, sink)
    sink.source = source
    assert Runtime(engine, source, sink, FileStore(tmp_path), learners=late_learners(engine.learner)).run() == 0
    assert source.lost_while_queued, "the situation under test never arose"
    assert sink.commits_in_callback == 0
    ids = [p["id"] for p in sink.visible]
    assert len(ids) == len(set(ids)), "a prediction was published twice"
    assert all(i.startswith("0-") for i in ids[-10:])  # s1 stayed lost


class GappySource(ListSource):
    """Every third poll brings nothing (a stream slower than the worker)."""

    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        self._polls = getattr(self, "_polls", 0) + 1
        return [] if self._polls % 3 == 0 else super().poll(max_records, timeout)


class CountingStore(FileStore):
    def __init__(self, directory):
        super().__init__(directory)
        self.positions: list[int] = []

    def save(self, shard: str, blob: bytes) -> None:
        self.positions.append(loads_snapshot(blob, self.spec).position)
        super().save(shard, blob)


def test_snapshots_between_polls_are_kept_when_empty_polls_publish_what_is_in_flight(tmp_path, late_learners):
    """An empty poll publishes every poll in flight; a snapshot asked for behind them is still
    taken (its worker half once the polls before it are published), not dropped."""
    settings = load_settings(data={"checkpoint": {"store": f"file://{tmp_path}", "every_records": 120},
                                   "limits": {"polls_in_flight": 3}, "telemetry": {"port": None}}, env={})
    engine = Engine(settings)
    source = GappySource(400)
    sink = TxnSink(source)
    sink.commits = 100  # no failures
    store = CountingStore(tmp_path)
    store.spec = engine.spec
    assert Runtime(engine, source, sink, store, learners=late_learners(engine.learner)).run() == 0
    between = [p for p in store.positions if 0 < p < 400]
    assert len(between) >= 2 * (800 // 120 - 1), f"snapshots between polls were dropped: {store.positions}"


def test_a_stop_request_turns_readiness_off_at_once(tmp_path):
    settings = load_settings(data={"telemetry": {"port": None}, "learner": "inline"}, env={})
    engine = Engine(settings)
    source = ListSource(10)
    runtime = Runtime(engine, source, TxnSink(source), None)
    engine.telemetry.set_ready(True)
    runtime.stop()
    assert not engine.telemetry.is_ready
