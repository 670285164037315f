"""The Kafka transport: a consumer-group source and a (transactional) producer sink.

The only module that imports ``confluent_kafka``; client errors are translated into
:mod:`worker.errors` here. A shard is one input partition, named ``f"{topic}-{partition}"``;
its position is the offset of the next record to consume.

Exactly-once (``delivery: exactly_once``): the sink begins a transaction on the first
output, produces every output (keyed by the record key) into it, and at each commit sends
the consumed offsets with the consumer's group metadata (``send_offsets_to_transaction``)
and commits. The periodic commit (``wait=False``, every ``commit_every_ms``) runs in a
helper thread while the worker goes on polling and learning; the next call that needs the
producer waits for it, so transactions never overlap. A failure inside the transaction aborts it and raises
:class:`~worker.transports.base.Rewind` (the runtime restores the shards from their
snapshots); a fenced producer (another process took the partitions or the transactional
id) is re-created and :class:`~worker.errors.FencedError` raised, with the same effect.
Offsets in the group only ever move inside a committed transaction, and a zombie's
transaction fails: its generation is stale (KIP-447), or its epoch was bumped.

At-least-once (``delivery: at_least_once``): an idempotent producer. Outputs are counted
into *epochs* (one per commit interval, see :class:`_Epoch`); a commit seals the current
epoch with the positions it covers, and the offsets of an epoch are committed once every
output of it and of all earlier epochs was acknowledged. The periodic commit
(``wait=False``) never blocks on the broker: it commits what is acknowledged by then; a
durable commit (``wait=True``: checkpoints, revoke, shutdown) flushes the producer first.

``open_kafka`` builds both from the settings. The helpers at the bottom (admin, a plain
producer, a compacted log) serve the feeder, the embedded demo and the Kafka checkpoint
store, so that they too stay free of client imports.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from worker.errors import FencedError, SinkError, SourceError, TransportError
from worker.records import Batch, Outputs
from worker.transports.base import AssignmentListener, Rewind

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.monitoring.telemetry import Telemetry

log = logging.getLogger("worker.kafka")
rdlog = logging.getLogger("worker.kafka.rdkafka")

#: Producer errors that mean another instance owns our transactional id or partitions.
FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})
#: Client errors that mean no broker can be reached (one closed connection is not one of them).
UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN})
TIMEOUT = 30.0  # bound on one blocking client call, seconds
#: ``Producer.produce``'s partition argument meaning "the partitioner decides" (librdkafka's
#: RD_KAFKA_PARTITION_UA), for passing the delivery callback after it positionally.
ANY_PARTITION = -1


def shard_name(topic: str, partition: int) -> str:
    return f"{topic}-{partition}"


def parse_shard(name: str) -> tuple[str, int]:
    topic, _, partition = name.rpartition("-")
    return topic, int(partition)


def _err(exc: KafkaException) -> KafkaError | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


class KafkaSource:
    """A consumer in a group (cooperative-sticky): partitions are shards, offsets positions."""

    def __init__(self, conf: dict[str, Any], topics: list[str], telemetry: Telemetry):
        self.conf = conf
        self.topics = topics
        self.telemetry = telemetry
        self.consumer: Consumer | None = None
        self._listener: AssignmentListener | None = None
        self._in_callback = False
        self._pending_seek: dict[str, int] = {}
        self._committed: dict[str, int | None] = {}
        self._callback_error: BaseException | None = None
        self._assigned: set[str] = set()
        self._closing = False
        #: An asynchronous offset commit failed since the sink last looked (it then commits every position again).
        self.commit_failed = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, listener: AssignmentListener) -> None:
        self._listener = listener
        conf = {**self.conf, "error_cb": self._on_error, "on_commit": self._on_commit, "logger": rdlog}
        try:
            self.consumer = Consumer(conf)
            self.consumer.subscribe(
                self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
        except KafkaException as exc:
            raise SourceError(f"cannot start the Kafka consumer: {exc}") from exc

    def close(self) -> None:
        """Leave the group (the final revoke commits and snapshots through the listener)."""
        if self.consumer is None:
            return
        self._closing = True
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer failed: %s", exc)
        self.consumer = None

    @property
    def exhausted(self) -> bool:
        return False

    # -- assignment ----------------------------------------------------------------------
    def _run_listener(self, method: str, partitions: list[TopicPartition]) -> list[str]:
        """Serve an assignment callback to the runtime. With the failure of an earlier callback
        still to be raised (a rewind follows), assigned shards are set up all the same, so that
        the rewind covers them, and revoked ones are forgotten as lost: nothing is committed."""
        names = [shard_name(tp.topic, tp.partition) for tp in partitions]
        if not names or self._listener is None:
            return names
        if self._callback_error is not None and method == "on_revoke":
            method = "on_lost"
        self._in_callback = True
        try:
            getattr(self._listener, method)(names)
        except BaseException as exc:  # re-raised by poll(), outside librdkafka's callback
            if self._callback_error is None:
                self._callback_error = exc
        finally:
            self._in_callback = False
        return names

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._closing:  # (a rebalance met while leaving: take nothing up; close() hands it all back)
            # Asking for the committed offsets from inside close() waited for the whole timeout:
            # a partner leaving the group at the moment of a stop held the stop for 30 s and more.
            consumer.incremental_assign(partitions)
            log.info("partitions assigned while leaving the group: not taken up",
                     extra={"shards": [shard_name(tp.topic, tp.partition) for tp in partitions]})
            return
        self._pending_seek = {}
        if partitions:
            try:
                self._committed = {
                    shard_name(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                    for tp in _retry(lambda: consumer.committed(partitions, timeout=TIMEOUT), "committed offsets")
                }
            except TransportError as exc:
                self._callback_error = exc
                return
        names = self._run_listener("on_assign", partitions)
        self._committed = {}
        self._assigned.update(names)
        tps = []
        for tp, name in zip(partitions, names, strict=True):
            offset = self._pending_seek.get(name)
            tps.append(TopicPartition(tp.topic, tp.partition, offset if offset is not None else OFFSET_BEGINNING))
        consumer.incremental_assign(tps)
        log.info("partitions assigned", extra={"shards": names})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        names = self._run_listener("on_revoke", partitions)
        self._assigned.difference_update(names)
        consumer.incremental_unassign(partitions)
        log.info("partitions revoked", extra={"shards": names})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        names = self._run_listener("on_lost", partitions)
        self._assigned.difference_update(names)
        consumer.incremental_unassign(partitions)
        log.warning("partitions lost", extra={"shards": names})

    def _on_error(self, err: KafkaError) -> None:
        self.telemetry.kafka_errors.labels(error=err.name()).inc()
        if err.code() in UNREACHABLE:
            self.telemetry.set_ready(False)
        log.warning("kafka consumer: %s", err)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [tp for tp in partitions or [] if tp.error is not None]
        if err is not None or failed:
            self.commit_failed = True
            log.warning("offset commit failed: %s", err or failed[0].error, extra={"shards": [
                shard_name(tp.topic, tp.partition) for tp in failed]})

    def committed(self, shard: str) -> int | None:
        if self._in_callback and shard in self._committed:
            return self._committed[shard]
        assert self.consumer is not None
        topic, partition = parse_shard(shard)
        tps = _retry(lambda: self.consumer.committed([TopicPartition(topic, partition)], timeout=TIMEOUT), "committed offsets")
        return tps[0].offset if tps[0].offset >= 0 else None

    def seek(self, shard: str, position: int) -> None:
        if self._in_callback:
            self._pending_seek[shard] = position
            return
        assert self.consumer is not None
        if shard not in self._assigned:
            return
        topic, partition = parse_shard(shard)
        tp = TopicPartition(topic, partition, position)
        try:
            self.consumer.seek(tp)
        except KafkaException:  # not fetching yet: re-assign at the offset instead
            self.consumer.incremental_unassign([TopicPartition(topic, partition)])
            self.consumer.incremental_assign([tp])

    def group_metadata(self) -> Any:
        assert self.consumer is not None
        return self.consumer.consumer_group_metadata()

    def commit_offsets(self, offsets: list[TopicPartition], wait: bool = True) -> None:
        """Commit ``offsets`` to the group (at-least-once); without ``wait`` asynchronously.

        A commit that fails (after retries of what librdkafka calls retriable: a rebalance in
        progress, a coordinator moving) is logged and sent again with the next commit: the
        outputs it covers are acknowledged already, so nothing is lost, and a restart before
        the next commit only replays them (duplicates, as at-least-once allows)."""
        consumer = self.consumer
        assert consumer is not None
        try:
            if wait:
                _retry(lambda: consumer.commit(offsets=offsets, asynchronous=False), "offset commit")
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
        except (TransportError, KafkaException) as exc:
            self.commit_failed = True
            log.warning("offset commit failed, sent again with the next commit: %s", exc)

    def lag(self, shard: str, position: int) -> int | None:
        """High watermark minus ``position`` from the client's cached watermarks (no request)."""
        if self.consumer is None:
            return None
        topic, partition = parse_shard(shard)
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        except KafkaException:
            return None
        return max(0, high - position) if high >= 0 else None

    # -- records -------------------------------------------------------------------------
    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        assert self.consumer is not None, "start() first"
        try:
            # Take what is already fetched; only when nothing is, wait for the first record (not
            # for a full batch: at low rates that wait would be added to every record's latency).
            msgs = self.consumer.consume(max_records, 0)
            if not msgs:
                msgs = self.consumer.consume(1, timeout)
                if msgs and max_records > 1:
                    msgs += self.consumer.consume(max_records - 1, 0)
        except KafkaException as exc:
            raise SourceError(f"consume failed: {exc}") from exc
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise exc
        if not msgs:
            return []
        batches: dict[Any, Batch] = {}
        current: Any = None
        values: list = []
        positions: list = []
        multi = len(self.topics) > 1
        for m in msgs:
            if m.error() is not None:
                self._message_error(m.error())
                continue
            tp = (m.topic(), m.partition()) if multi else m.partition()
            if tp != current:
                b = batches.get(tp)
                if b is None:
                    b = batches[tp] = Batch(shard_name(m.topic(), m.partition()), [], [])
                values, positions, current = b.values, b.positions, tp
            values.append(m.value() or b"")
            positions.append(m.offset())
        if not self.telemetry.is_ready and self._assigned:
            self.telemetry.set_ready(True)
        return list(batches.values())

    def _message_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise SourceError(f"fatal consumer error: {err}")
        self._on_error(err)


class _Epoch:
    """At-least-once: the outputs produced between two commits and the positions they cover.

    Each output of the epoch carries :meth:`delivered` as its delivery callback; the epoch is
    acknowledged when ``pending`` is back to zero.
    """

    __slots__ = ("pending", "errors", "offsets")

    def __init__(self) -> None:
        self.pending = 0
        self.errors: list[KafkaError] = []
        self.offsets: list[TopicPartition] = []  # set when the epoch is sealed

    def delivered(self, err: KafkaError | None, msg: Any) -> None:
        self.pending -= 1
        if err is not None:
            self.errors.append(err)


class KafkaSink:
    """Outputs to topics; commits in one transaction with the offsets (or after delivery)."""

    def __init__(
        self,
        conf: dict[str, Any],
        topics: dict[str, str | None],
        source: KafkaSource,
        telemetry: Telemetry,
        exactly_once: bool = True,
        commit_every: float = 0.2,
    ):
        self.conf = conf
        self.topics = {k: t for k, t in topics.items() if t}
        self.source = source
        self.telemetry = telemetry
        self.exactly_once = exactly_once
        self.commit_every = commit_every
        self._routes = [(kind, topic) for kind, topic in self.topics.items()]
        self._in_txn = False
        self._committed: dict[str, int] = {}
        self._delivery_logged = 0.0
        self._epoch = _Epoch()  # at-least-once: the outputs since the last commit
        self._sealed: collections.deque[_Epoch] = collections.deque()  # committed, not yet acknowledged
        #: exactly-once: a periodic commit running in a helper thread (its call, offsets, start time)
        self._committing: tuple[_Call, list[TopicPartition], float] | None = None
        self._c = {o: telemetry.kafka_commits.labels(outcome=o) for o in ("committed", "retried", "aborted", "fenced")}
        self._call_timeout = min(TIMEOUT, float(conf.get("transaction.timeout.ms", 60000)) / 1000)
        self.producer = self._new_producer()

    def _new_producer(self) -> Producer:
        conf = {
            **self.conf,
            "error_cb": self._on_error,
            "on_delivery": self._on_delivery,
            # at-least-once counts acknowledgements per epoch; exactly-once needs only the errors
            "delivery.report.only.error": self.exactly_once,
            "logger": rdlog,
        }
        try:
            producer = Producer(conf)
            if self.exactly_once:
                _retry(lambda: producer.init_transactions(TIMEOUT), "init_transactions")
        except KafkaException as exc:
            raise SinkError(f"cannot start the Kafka producer: {exc}") from exc
        self._in_txn = False
        return producer

    def _on_error(self, err: KafkaError) -> None:
        self.telemetry.kafka_errors.labels(error=err.name()).inc()
        if err.code() in UNREACHABLE:
            self.telemetry.set_ready(False)
        log.warning("kafka producer: %s", err)

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        """Exactly-once only (at-least-once outputs carry their epoch's callback): a failed
        delivery also fails the transaction's commit, which aborts it; here it is only logged."""
        if err is not None:
            self.telemetry.kafka_errors.labels(error=err.name()).inc()
            now = time.monotonic()
            if now - self._delivery_logged >= 1.0:  # (at most once a second: a failure comes in bursts)
                self._delivery_logged = now
                log.warning("an output was not delivered: %s", err)

    # -- publishing ----------------------------------------------------------------------
    def publish(self, outputs: Outputs) -> None:
        self._settle()  # (outside the try below: a failed commit was handled there already)
        producer = self.producer
        produce = producer.produce
        kinds = outputs.by_kind()
        epoch = None if self.exactly_once else self._epoch
        done = None if epoch is None else epoch.delivered
        try:
            for kind, topic in self._routes:
                messages = kinds[kind]
                if not messages:
                    continue
                if epoch is not None:
                    epoch.pending += len(messages)
                elif not self._in_txn:
                    producer.begin_transaction()
                    self._in_txn = True
                for key, value in messages:
                    try:  # (positional: a keyword makes the C call build a dict, ~0.3 µs per message)
                        produce(topic, value, key, ANY_PARTITION, done)
                    except BufferError:  # the local queue is full: serve deliveries, then retry
                        self._produce_when_room(topic, value, key, done)
                    except KafkaException as exc:
                        err = _err(exc)
                        if err is None or err.code() != KafkaError.MSG_SIZE_TOO_LARGE:
                            raise
                        self._too_large(topic, value, key, done, exc)
            producer.poll(0)
        except Exception as exc:  # noqa: BLE001 - any failure inside a transaction aborts it
            self._failed(exc, "produce")

    def _too_large(self, topic: str, value: bytes, key: bytes | None, done: Any, exc: KafkaException) -> None:
        """An output longer than the producer's ``message.max.bytes``: it would fail on every
        replay, so a short dead letter takes its place (its first KiB, its length, its topic)."""
        dead = self.topics.get("dead_letter")
        self.telemetry.dead_letters.labels(reason="output_too_large").inc()
        log.error("an output was too large for the producer: dead-lettered", extra={"topic": topic, "bytes": len(value)})
        if dead is None:
            if done is not None:
                self._epoch.pending -= 1  # (at-least-once: counted, never sent)
            return
        letter = orjson.dumps({"event": "dead_letter", "reason": "output_too_large", "detail": str(exc),
                               "output": topic, "bytes": len(value), "head": value[:1024].decode("utf-8", "replace")})
        self.producer.produce(dead, letter, key, ANY_PARTITION, done)

    def _produce_when_room(self, topic: str, value: bytes, key: bytes | None, done: Any) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.producer.poll(0.05)
            try:
                self.producer.produce(topic, value, key, ANY_PARTITION, done)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise SinkError("the producer queue stayed full: is the broker reachable?") from None

    # -- committing ----------------------------------------------------------------------
    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        """Commit outputs and ``positions``.

        Exactly-once: the transaction. With ``wait`` it is committed on return; without (the
        periodic commit) it commits in a helper thread while this one goes on polling,
        decoding and learning, and the next call that needs the producer (``publish``,
        ``commit``, ``abort``, ``close``) waits for it first and raises its failure there
        (:class:`Rewind` or :class:`FencedError`, exactly as a synchronous commit would).
        At-least-once: seal the outputs since the last commit with ``positions``; with ``wait``
        flush first, so everything is acknowledged and committed on return; without, commit
        the positions of the sealed epochs acknowledged by now and leave the rest for later."""
        self._settle()
        if not self.exactly_once and self.source.commit_failed:  # an asynchronous commit was lost:
            self.source.commit_failed = False  # send every position again
            self._committed.clear()
        offsets = [
            TopicPartition(*parse_shard(name), pos) for name, pos in positions.items() if self._committed.get(name) != pos
        ]
        started = time.perf_counter()
        if self.exactly_once:
            if not self._in_txn and not offsets:
                return
            try:
                meta = self.source.group_metadata() if offsets else None
                if not wait:
                    self._committing = (_Call(lambda: self._run_commit(offsets, meta)), offsets, started)
                    return
                self._run_commit(offsets, meta)
            except Exception as exc:  # noqa: BLE001 - any failure inside a transaction aborts it
                self._commit_failed(exc)
            self._in_txn = False
            self._c["committed"].inc()
        else:
            epoch = self._epoch
            if offsets or epoch.pending or epoch.errors:
                epoch.offsets = offsets
                self._sealed.append(epoch)
                self._epoch = _Epoch()
            if not self._sealed:
                return
            if wait:
                self._flush()
            else:
                self.producer.poll(0)  # serve the acknowledgements that arrived
            offsets = self._acknowledged()
            if not offsets:
                return
            self.source.commit_offsets(offsets, wait=wait)
            self._c["committed"].inc()
        self._done(offsets, time.perf_counter() - started)

    def _settle(self) -> None:
        """Wait for the exactly-once commit in flight, if any; handle its failure as a
        synchronous commit does (abort, or a new producer; then raise)."""
        if self._committing is None:
            return
        call, offsets, started = self._committing
        self._committing = None
        try:
            seconds = call.result() - started
        except Exception as exc:  # noqa: BLE001 - any failure inside a transaction aborts it
            self._commit_failed(exc)
        self._in_txn = False
        self._c["committed"].inc()
        self._done(offsets, seconds)

    def _done(self, offsets: list[TopicPartition], seconds: float) -> None:
        """Bookkeeping after a successful commit of ``offsets``."""
        self.telemetry.kafka_commit_seconds.observe(seconds)
        for tp in offsets:
            name = shard_name(tp.topic, tp.partition)
            self._committed[name] = tp.offset
            lag = self.source.lag(name, tp.offset)
            if lag is not None:
                self.telemetry.kafka_lag.labels(shard=name).set(lag)
        self.telemetry.set_ready(True)

    def _acknowledged(self) -> list[TopicPartition]:
        """Offsets of the sealed epochs acknowledged in order from the oldest (the latest
        position per partition); a delivery error drops every sealed epoch and raises Rewind."""
        latest: dict[tuple[str, int], TopicPartition] = {}
        sealed = self._sealed
        while sealed and sealed[0].pending <= 0:
            epoch = sealed.popleft()
            if epoch.errors:
                sealed.clear()
                self._c["aborted"].inc()
                raise Rewind(f"{len(epoch.errors)} output(s) not delivered (first: {epoch.errors[0]}): replaying")
            for tp in epoch.offsets:
                latest[(tp.topic, tp.partition)] = tp
        return list(latest.values())

    def _run_commit(self, offsets: list[TopicPartition], meta: Any) -> float:
        """Send ``offsets`` into the transaction and commit it (retrying what librdkafka calls
        retriable); returns when it finished (``perf_counter``). Runs in this thread or in a
        helper (the periodic commit): it touches nothing but the producer and the telemetry."""
        producer = self.producer
        deadline = time.monotonic() + TIMEOUT * 2
        if not self._in_txn:
            producer.begin_transaction()
            self._in_txn = True
        if offsets:
            _bounded(lambda: producer.send_offsets_to_transaction(offsets, meta, self._call_timeout),
                     self._call_timeout + 5.0, on_slow=lambda: self.telemetry.set_ready(False))
        while True:
            try:
                producer.commit_transaction(self._call_timeout)
                return time.perf_counter()
            except KafkaException as exc:
                err = _err(exc)
                if err is None or not err.retriable() or time.monotonic() > deadline:
                    raise
                self._c["retried"].inc()
                self.telemetry.set_ready(False)
                log.warning("commit_transaction will be retried: %s", err)

    def _commit_failed(self, exc: Exception) -> None:
        """A commit that failed: abandon a stuck producer, else abort (see :meth:`_failed`); raises."""
        if isinstance(exc, _Stuck):
            self._c["aborted"].inc()
            log.error("%s: abandoning the producer for a new one (same transactional id)", exc)
            self.producer = self._new_producer()  # fences the stuck one and aborts its transaction
            raise Rewind(str(exc)) from None
        self._failed(exc, "commit")

    def _failed(self, exc: Exception, what: str) -> None:
        """A failure inside a transaction: abort (or re-create a fenced producer) and raise."""
        err = _err(exc) if isinstance(exc, KafkaException) else None
        if not self.exactly_once:
            if err is not None and err.fatal():
                self.producer = self._new_producer()
                # the old producer's acknowledgements will never come: the outputs it held are
                # replayed after the rewind, and the epochs waiting for them would block every commit
                self._sealed.clear()
                self._epoch = _Epoch()
                raise Rewind(f"fatal producer error on {what}: {err}; producer re-created") from exc
            raise SinkError(f"{what} failed: {exc}") from exc
        if err is not None and (err.code() in FENCED or err.fatal()):
            self._c["fenced"].inc()
            log.error("producer fenced on %s: %s; re-creating it", what, err)
            self._replace_producer()
            raise FencedError(f"producer fenced on {what}: {err}") from exc
        self._c["aborted"].inc()
        log.warning("transaction aborted after a failure in %s: %s", what, exc)
        self._abort_or_replace()
        raise Rewind(f"{what} failed inside a transaction ({exc}); it was aborted") from exc

    def _abort_or_replace(self) -> None:
        try:
            _retry(lambda: self.producer.abort_transaction(TIMEOUT), "abort_transaction")
            self._in_txn = False
        except (TransportError, KafkaException) as exc:
            log.warning("abort failed (%s): re-creating the producer", exc)
            self._replace_producer()

    def _replace_producer(self) -> None:
        old = self.producer
        try:
            old.purge()
        except (KafkaException, RuntimeError):
            pass
        self.producer = self._new_producer()

    def abort(self) -> bool:
        """Drop uncommitted outputs (partitions were lost); True if a transaction was open."""
        try:
            self._settle()
        except (Rewind, FencedError):  # the commit in flight failed: its transaction is gone already
            return True
        if not (self.exactly_once and self._in_txn):
            return False
        self._c["aborted"].inc()
        self._abort_or_replace()
        return True

    def _flush(self) -> None:
        deadline = time.monotonic() + TIMEOUT * 10
        while self.producer.flush(1.0) > 0:
            self.telemetry.set_ready(False)
            if time.monotonic() > deadline:
                raise SinkError("outputs could not be delivered: is the broker reachable?")

    # -- snapshots -----------------------------------------------------------------------
    def checkpoint_state(self, shard: str, position: int = 0) -> dict:
        return {}  # outputs since the snapshot are in the committed log: nothing to cut back

    def restore(self, shard: str, state: dict) -> None:
        self._settle()
        self._committed.pop(shard, None)

    def close(self) -> None:
        try:
            self._settle()
        except (Rewind, FencedError) as exc:
            log.warning("the last commit failed: %s", exc)
        try:
            if self.exactly_once and self._in_txn:
                self.producer.abort_transaction(10)
                self._in_txn = False
            self.producer.flush(10)
        except KafkaException as exc:
            log.warning("closing the producer: %s", exc)


class _Stuck(Exception):
    pass


class _Call:
    """``fn()`` running in a daemon helper thread; :meth:`result` waits and returns or re-raises."""

    def __init__(self, fn: Any):
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), name="kafka-call", daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self._outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._outcome["error"] = exc

    def wait(self, timeout: float | None) -> bool:
        """True once the call has returned (or raised)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome.get("value")


def _bounded(fn: Any, timeout: float, on_slow: Any = None) -> Any:
    """Run a blocking client call in a helper thread and give up waiting after ``timeout``.

    librdkafka's ``send_offsets_to_transaction`` can block past its own timeout when the group
    coordinator went away (confluentinc/librdkafka#5456, #5511); the caller then abandons
    the producer instead of hanging (and ignoring SIGTERM) forever.
    """
    call = _Call(fn)
    if not call.wait(min(1.0, timeout)) and on_slow is not None:
        on_slow()  # more than a second for one call: the brokers are in trouble
    if not call.wait(max(0.0, timeout - 1.0)):
        raise _Stuck(f"a transactional call did not return within {timeout:.0f}s")
    return call.result()


def _retry(fn: Any, what: str, attempts: int = 5) -> Any:
    """Call ``fn`` again on retriable client errors (backoff 0.5 s, 1 s, 2 s, ...)."""
    delay = 0.5
    for attempt in range(attempts):
        try:
            return fn()
        except KafkaException as exc:
            err = _err(exc)
            if err is None or not err.retriable() or attempt == attempts - 1:
                raise TransportError(f"{what} failed: {exc}") from exc
            log.warning("%s failed (%s): retrying in %.1fs", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


# -- building from the settings --------------------------------------------------------------
def client_configs(settings: Settings) -> tuple[dict, dict]:
    """(consumer config, producer config) rendered from ``source.kafka`` and ``delivery``."""
    k = settings.source.kafka
    assert k is not None
    common = {"bootstrap.servers": k.bootstrap_servers, **k.config}
    consumer = {
        "group.id": k.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        **common,
        **k.consumer,
    }
    producer: dict[str, Any] = {"linger.ms": 1, "batch.num.messages": 10000, "acks": "all", **common}
    if settings.delivery == "exactly_once":
        producer["transactional.id"] = k.transactional_id or f"{k.group_id}-{socket.gethostname()}"
    else:
        producer["enable.idempotence"] = True
    producer.update(k.producer)
    return consumer, producer


def open_kafka(settings: Settings, telemetry: Telemetry) -> tuple[KafkaSource, KafkaSink]:
    k = settings.source.kafka
    assert k is not None
    consumer_conf, producer_conf = client_configs(settings)
    source = KafkaSource(consumer_conf, list(k.topics), telemetry)
    sink = KafkaSink(
        producer_conf,
        settings.outputs.model_dump(),
        source,
        telemetry,
        exactly_once=settings.delivery == "exactly_once",
        commit_every=k.commit_every_ms / 1000,
    )
    return source, sink


# -- helpers for the feeder, the demo and the checkpoint store ------------------------------
def admin(bootstrap: str, **conf: Any) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "logger": rdlog, **conf})


def create_topics(
    bootstrap: str, names: Iterable[str], partitions: int = 1, config: dict | None = None, timeout: float = 30.0,
    conf: dict | None = None,
) -> None:
    """Create topics (existing ones are left alone) and wait until each has its leaders.

    ``config``: the topics' settings (``cleanup.policy``...); ``conf``: the client's (security
    settings: SASL, TLS). The replication factor is the broker's ``default.replication.factor``.
    """
    client = admin(bootstrap, **(conf or {}))
    names = list(names)
    try:
        futures = client.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=-1, config=dict(config or {})) for n in names],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
            except KafkaException as exc:
                err = _err(exc)
                if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TransportError(f"cannot create topic {name}: {exc}") from exc
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            md = client.list_topics(timeout=5)
            pending = {
                n for n in pending
                if not ((t := md.topics.get(n)) and t.error is None and t.partitions
                        and all(p.leader >= 0 for p in t.partitions.values()))
            }
            if pending and time.monotonic() > deadline:
                raise TransportError(f"topics {sorted(pending)} have no leader after {timeout}s")
            if pending:
                time.sleep(0.1)
    except (KafkaException, TimeoutError) as exc:  # (concurrent.futures' TimeoutError is this one)
        raise TransportError(f"cannot create topics {names} on {bootstrap}: {exc or 'timed out'}") from exc


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    client = admin(bootstrap)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.list_topics(timeout=2).brokers:
                return
        except KafkaException:
            pass
        if time.monotonic() > deadline:
            raise TransportError(f"no Kafka broker answers on {bootstrap} after {timeout}s")
        time.sleep(0.1)


class RecordProducer:
    """A plain idempotent producer for the feeder: ``send`` then ``flush``."""

    def __init__(self, bootstrap: str, **conf: Any):
        self._errors: list[KafkaError] = []
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 10, "logger": rdlog,
             "on_delivery": self._on_delivery, "delivery.report.only.error": True, **conf}
        )

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err)

    def send(self, topic: str, value: bytes | None, key: bytes | None = None, partition: int | None = None) -> None:
        args: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, value, key, **args)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout: float = TIMEOUT) -> None:
        if self.producer.flush(timeout) > 0:
            raise SinkError(f"records not delivered after {timeout}s")
        if self._errors:
            raise SinkError(f"{len(self._errors)} record(s) not delivered: {self._errors[0]}")


class OutputReader:
    """Reads the worker's output topics from the start, as a read_committed client would."""

    def __init__(self, bootstrap: str, topics: list[str], **conf: Any):
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"worker-reader-{time.time_ns()}", "enable.auto.commit": False,
             "auto.offset.reset": "earliest", "isolation.level": "read_committed", "logger": rdlog, **conf}
        )
        # assign every partition (no group join: quick, also on brokers with slow joins);
        # topics that do not exist yet are looked for again at most once a second
        self._missing = set(topics)
        self._looked = 0.0
        self._assign_new()

    def _assign_new(self) -> None:
        self._looked = time.monotonic()
        md = self.consumer.list_topics(timeout=TIMEOUT)
        found = [t for t in self._missing if t in md.topics and md.topics[t].error is None and md.topics[t].partitions]
        if found:
            self.consumer.incremental_assign(
                [TopicPartition(t, p, OFFSET_BEGINNING) for t in found for p in md.topics[t].partitions]
            )
            self._missing.difference_update(found)

    def poll(self, timeout: float, kinds: dict[str, str]) -> Outputs:
        """Messages that arrived, as :class:`Outputs` (``kinds``: output kind -> topic)."""
        if self._missing and time.monotonic() - self._looked > 1.0:
            self._assign_new()
        by_topic = {t: k for k, t in kinds.items()}
        out = Outputs()
        lists = out.by_kind()
        for m in self.consumer.consume(1000, timeout):
            if m.error() is None and m.topic() in by_topic:
                lists[by_topic[m.topic()]].append((m.key(), m.value()))
        return out

    def close(self) -> None:
        self.consumer.close()


class CompactedLog:
    """Key/value records on partition 0 of one topic: append, then read everything back.

    ``append`` returns once every record is acknowledged (acks=all, idempotent, in order).
    ``read`` yields ``(key, value)`` from where the previous call stopped up to the current
    end of the partition (``value`` None for a tombstone).
    """

    def __init__(self, bootstrap: str, topic: str, conf: dict[str, Any] | None = None):
        self.topic = topic
        conf = dict(conf or {})
        self.producer = RecordProducer(bootstrap, acks="all", **conf)
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"worker-log-reader-{topic}", "enable.auto.commit": False,
             "auto.offset.reset": "earliest", "enable.partition.eof": True, "logger": rdlog, **conf}
        )
        self._next: int | None = None
        self._assigned = False

    def append(self, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        try:
            for key, value in records:
                self.producer.send(self.topic, value, key, partition=0)
            self.producer.flush()
        except KafkaException as exc:
            raise TransportError(f"cannot write to {self.topic}: {exc}") from exc

    def read(self, timeout: float = TIMEOUT) -> Iterator[tuple[bytes, bytes | None]]:
        tp = TopicPartition(self.topic, 0)
        try:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as exc:
            raise TransportError(f"cannot read {self.topic}: {exc}") from exc
        if self._next is None:
            self._next = low
        if self._next >= high:
            return
        if not self._assigned:
            self.consumer.assign([TopicPartition(self.topic, 0, self._next)])
            self._assigned = True
        deadline = time.monotonic() + timeout
        while self._next < high:
            if time.monotonic() > deadline:
                raise TransportError(f"reading {self.topic} timed out at offset {self._next} of {high}")
            for m in self.consumer.consume(1000, 0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._next = max(self._next, m.offset())
                        continue
                    raise TransportError(f"reading {self.topic}: {err}")
                self._next = m.offset() + 1
                yield m.key(), m.value()

    def close(self) -> None:
        try:
            self.producer.flush(10)
        except SinkError as exc:
            log.warning("closing %s: %s", self.topic, exc)
        self.consumer.close()


__all__ = [
    "FENCED", "OFFSET_INVALID", "CompactedLog", "KafkaSink", "KafkaSource", "OutputReader", "RecordProducer",
    "client_configs", "create_topics", "open_kafka", "shard_name", "wait_for_broker",
]
