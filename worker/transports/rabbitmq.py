"""The RabbitMQ transport: single-active-consumer shard queues in, confirmed publishes out.

The only module that imports ``pika``; client errors become :mod:`worker.errors` here.

Topology (declared at start, idempotently, unless ``declare: false``)::

    producers --routing key = record key--> exchange E (x-consistent-hash)
                                              |-- weight 1 --> queue E.0  (single active consumer)
                                              |-- ...
                                              '-- weight 1 --> queue E.{n-1}

Every replica consumes every shard queue; the broker delivers each queue to one consumer
at a time and hands it to the next one when that consumer's connection goes (failover,
not rebalancing: see docs/rabbitmq.md). A shard is one queue, named after it; it is
assigned when its first delivery arrives, and lost with the connection. A record's
position is the number of records of its queue taken before it (the snapshot's position,
then one more per delivery).

Outputs (``outputs.*`` are queue names, declared durable) are published persistent through
the default exchange on one channel with publisher confirms, asynchronously: a commit waits
until everything published so far is confirmed, never one round trip per message.

Acknowledgements. Without a checkpoint store a commit acks the deliveries it covers once
their outputs are confirmed (at-least-once). With one, a delivery is acked only after a
snapshot that covers it is durable (the runtime calls :meth:`RabbitSink.snapshotted`): a
crash then redelivers every record the last snapshot does not have, and the model learns
each record exactly once. What a crash can also redeliver: the records of the last
snapshot whose ack was still on its way. A snapshot therefore keeps a *window*, the
fingerprints (CRC-32 and length of the body) of the records between the previous snapshot's
ack, known to be applied (a ``basic.qos`` round trip on the queue's channel after the ack
is its receipt), and its own position. On restore, redelivered records that match the
window from its start are the ones the snapshot already has: they are acked, not learned
(:class:`_Dedup`). Outputs are at-least-once: records after the last snapshot are learned
again from it, and their predictions published again (the same predictions: the model is
deterministic).

The connection lives in an I/O thread (pika's ``SelectConnection``); the worker's thread
hands it publishes and acks with ``add_callback_threadsafe`` and takes deliveries from it.
When the connection drops, every shard is lost (the runtime drops their state unsaved)
and the thread reconnects with backoff; the broker redelivers what was not acked.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from worker.errors import SinkError, SourceError
from worker.records import Batch, Outputs
from worker.transports.base import AssignmentListener, Rewind

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.monitoring.telemetry import Telemetry

log = logging.getLogger("worker.rabbitmq")
logging.getLogger("pika").setLevel(logging.WARNING)  # (its INFO lines narrate every channel open and close)

TIMEOUT = 30.0  # bound on one wait for the broker (confirms, an ack's receipt, the connection)
#: Redelivered records matched against a snapshot's window before they are taken as already learned.
MATCH = 8
PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")
#: Seconds between two samples of each owned queue's ready messages (``worker_rabbitmq_ready_messages``).
READY_EVERY = 5.0


def shard_queues(queue: str, shards: int) -> list[str]:
    """The shard queue names: ``queue.0`` .. ``queue.{shards-1}``.

    >>> shard_queues("events", 3)
    ['events.0', 'events.1', 'events.2']
    """
    return [f"{queue}.{i}" for i in range(shards)]


def fingerprint(body: bytes) -> int:
    """What a snapshot's window keeps of a record: CRC-32 and length, in one int.

    >>> fingerprint(b'{"x": 1}') == fingerprint(b'{"x": 1}'), fingerprint(b"a") == fingerprint(b"b")
    (True, False)
    """
    return (len(body) << 32) | zlib.crc32(body)


def declare_topology(url: str, exchange: str, queues: list[str], outputs: list[str]) -> None:
    """Declare the consistent-hash exchange, the shard queues bound to it and the output queues."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as exc:
        raise SourceError(f"cannot connect to RabbitMQ at {_safe(url)}: {exc!r}") from exc
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, "x-consistent-hash", durable=True)
        for q in queues:
            ch.queue_declare(q, durable=True, arguments={"x-single-active-consumer": True})
            ch.queue_bind(q, exchange, routing_key="1")
        for q in outputs:
            ch.queue_declare(q, durable=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise SourceError(f"RabbitMQ refused the topology (exchange {exchange!r}, queues {queues}): {exc}") from exc
    except pika.exceptions.AMQPError as exc:
        raise SourceError(f"declaring the RabbitMQ topology failed: {exc!r}") from exc
    finally:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass


def _safe(url: str) -> str:
    """The URL without its password (for messages)."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{tail}"


class _Queue:
    """One shard queue's deliveries and acknowledgements, shared by the source and the sink."""

    def __init__(self, name: str):
        self.name = name
        self.channel: Any = None  # (I/O thread) the channel it is consumed on, None while disconnected
        self.inbox: collections.deque = collections.deque()  # (body, delivery tag, redelivered) from the I/O thread
        # The worker thread's view, from the assignment on:
        self.next_position = 0  # the position of the next record taken
        self.tags: collections.deque[int] = collections.deque()  # delivery tags of the records not acked yet
        self.first = 0  # the position of tags[0]
        self.prints: collections.deque[int] = collections.deque()  # fingerprints from position `applied` on
        self.applied = 0  # every ack below this position is known applied (its receipt came)
        self.sent: list[int] = []  # positions of acks sent since, receipt not seen yet
        self.receipts: collections.deque[int] = collections.deque()  # (I/O thread) positions whose ack is applied
        self.generation = 0  # the connection its delivery tags belong to
        self.dedup: _Dedup | None = None
        self.ready: int | None = None  # (I/O thread) messages ready in the queue at the last sample

    def reset(self, position: int, generation: int) -> None:
        """Taken from ``position`` on, on connection ``generation`` (at an assignment, then at the seek)."""
        self.next_position = self.first = self.applied = position
        self.generation = generation
        self.tags.clear()
        self.prints.clear()
        self.sent.clear()
        self.receipts.clear()

    def settle(self) -> None:
        """Take the receipts that came: forget the fingerprints below the last applied ack."""
        if not self.receipts:
            return
        applied = self.applied
        while self.receipts:
            applied = max(applied, self.receipts.popleft())
        for _ in range(applied - self.applied):
            self.prints.popleft()
        self.applied = applied
        self.sent = [p for p in self.sent if p > applied]


class _Dedup:
    """Takes the redelivered records a restored snapshot already learned off the front of a queue.

    ``window``: the fingerprints of the records just below the snapshot's position, from its
    last ack known applied; ``cuts``: the offsets in it where the queue may start (0, and
    where each ack sent without a receipt ends). The queue starts at one of them, or at the
    snapshot's position. Redelivered records matching the window from a cut are dropped;
    up to :data:`MATCH` of them are held back until the match is certain, and the first
    record that is not redelivered or matches no cut ends it (the held ones are then taken
    normally).

    >>> d = _Dedup([1, 2, 3], [0])
    >>> d.feed((b"a", 7, True), 1), d.feed((b"b", 8, True), 2), d.feed((b"c", 9, True), 3)
    ([], [], [])
    >>> d.skipped, d.done
    ([7, 8, 9], True)
    >>> d = _Dedup([1, 2, 3], [0, 2])  # an ack up to the 2nd record was sent, its receipt unseen
    >>> d.feed((b"c", 9, True), 3), d.skipped, d.done
    ([], [9], True)
    >>> d = _Dedup([1, 2, 3], [0])
    >>> d.feed((b"a", 7, True), 1), d.feed((b"z", 8, True), 99)
    ([], [(b'a', 7, True), (b'z', 8, True)])
    >>> d.skipped, d.done
    ([], True)
    """

    def __init__(self, window: list[int], cuts: list[int]):
        self.window = window
        self.candidates = [c for c in cuts if 0 <= c < len(window)]
        self.held: list = []
        self.skipped: list[int] = []  # delivery tags of records dropped, not acked yet (the source takes them)
        self.dropped = 0  # records dropped so far
        self.start: int | None = None  # the cut the queue starts at, once certain
        self.done = not self.candidates

    def feed(self, delivery: tuple, fp: int) -> list:
        """The deliveries to take normally now (in order) after ``delivery`` arrived."""
        window = self.window
        if self.start is not None:  # certain: drop the rest of the window as it comes
            if delivery[2] and fp == window[self.start + self.dropped]:
                self.skipped.append(delivery[1])
                self.dropped += 1
                self.done = self.start + self.dropped == len(window)
                return []
            log.warning("a redelivered record differs from the snapshot's window: taken as new")
            self.done = True
            return [delivery]
        h = len(self.held)
        self.candidates = [c for c in self.candidates if c + h < len(window) and window[c + h] == fp] \
            if delivery[2] else []
        if not self.candidates:
            released, self.held = [*self.held, delivery], []
            self.done = True
            return released
        self.held.append(delivery)
        start = self.candidates[0]
        if len(self.held) >= min(MATCH, len(window) - start):
            self.start = start
            self.skipped = [d[1] for d in self.held]
            self.dropped = len(self.held)
            self.held = []
            self.done = start + self.dropped == len(window)
        return []


class RabbitConnection:
    """The AMQP connection, in its own I/O thread: one channel per shard queue (consume, ack)
    and one for publishing outputs (confirms). Reconnects with backoff until closed."""

    def __init__(self, url: str, queues: list[str], prefetch: int, fingerprints: bool):
        self.url = url
        self.params = pika.URLParameters(url)
        self.queues = {q: _Queue(q) for q in queues}
        self._order = list(self.queues.values())
        self.prefetch = prefetch
        self.fingerprints = fingerprints  # keep each record's fingerprint until its ack is applied
        self._cond = threading.Condition()
        self._waiting = False  # the worker thread waits for deliveries
        self._connection: Any = None
        self._publisher: Any = None
        # Outputs handed over by the worker thread, and resolved (published or given up) by the
        # I/O thread; on the current publisher channel: published (confirm tags 1..n), confirmed.
        self._handed = self._resolved = 0
        self._tags = self._confirmed = 0
        self._failure: str | None = None  # a nack or a lost connection since the last commit
        self._generation = 0  # connections lost or dropped; each loses every shard
        self._dropping = False  # deliveries are dropped until the next connection opens
        self._closing = False
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    # -- worker thread -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rabbitmq-io", daemon=True)
        self._thread.start()

    @property
    def generation(self) -> int:
        return self._generation

    def take(self, max_records: int, timeout: float) -> dict[str, list]:
        """Deliveries waiting, by queue (at most ``max_records``, the queues in turn); waits up to
        ``timeout`` for the first."""
        order = self._order
        if timeout > 0 and not any(q.inbox for q in order):
            with self._cond:
                self._waiting = True  # (before the check: a delivery after it notifies)
                if not any(q.inbox for q in order):
                    self._cond.wait(timeout)
                self._waiting = False
        out: dict[str, list] = {}
        room = max_records
        for q in order:
            inbox = q.inbox
            if inbox and room > 0:
                n = min(len(inbox), room)
                out[q.name] = [inbox.popleft() for _ in range(n)]
                room -= n
        order.append(order.pop(0))  # the next take starts with the next queue
        return out

    def _call(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` in the I/O thread, in order with every other call; False when disconnected."""
        conn = self._connection
        if conn is None:
            return False
        try:
            conn.ioloop.add_callback_threadsafe(fn)
        except (pika.exceptions.AMQPError, RuntimeError, AttributeError):
            return False
        return True

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        with self._cond:
            self._handed += len(messages)
        if not self._call(lambda: self._publish(messages)):
            self._give_up(len(messages), "the RabbitMQ connection is down: outputs not published")

    def wait_confirmed(self, timeout: float = TIMEOUT) -> None:
        """Every output handed over so far is confirmed by the broker. Raises Rewind when one was
        refused or the connection dropped (outputs since the last commit may be lost)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._failure is None and (self._resolved < self._handed or self._confirmed < self._tags):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SinkError(f"RabbitMQ did not confirm the outputs within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))
            failure, self._failure = self._failure, None
        if failure is not None:
            self._drop()
            raise Rewind(failure)

    def _drop(self) -> None:
        """Close the connection and lose every shard: the broker then redelivers every record not
        acked, so the shards restored from their snapshots read all they need again. (Reading on
        after a rollback would skip the records taken since the snapshot: a queue cannot seek.)"""
        with self._cond:
            self._dropping = True
            self._generation += 1
        for q in self.queues.values():
            q.inbox.clear()
        conn = self._connection
        if conn is not None:
            self._call(lambda: conn.close(reply_text="rolled back") if conn.is_open else None)

    def ack(self, queue: str, tag: int, position: int) -> None:
        """Ack ``queue``'s deliveries up to ``tag`` (the record below ``position``); a ``basic.qos``
        round trip on the channel after it is its receipt (the broker applied it)."""
        q = self.queues[queue]
        if self.fingerprints:
            q.sent.append(position)
        generation = q.generation
        self._call(lambda: self._ack(q, tag, position, generation))

    def sample_ready(self, queues: list[str]) -> None:
        """Ask the broker how many messages wait in each of ``queues`` (a passive declare on its
        channel); the answers land in ``_Queue.ready``."""
        picked = [self.queues[name] for name in queues]
        self._call(lambda: self._sample_ready(picked))

    def close(self) -> None:
        """Send what is queued (acks included), close the connection and stop the I/O thread."""
        self._closing = True
        conn = self._connection
        if conn is not None:
            try:
                conn.ioloop.add_callback_threadsafe(lambda: conn.close() if conn.is_open else conn.ioloop.stop())
            except (pika.exceptions.AMQPError, RuntimeError, AttributeError):
                pass
        if self._thread is not None:
            self._thread.join(10.0)

    def _give_up(self, n: int, why: str) -> None:
        with self._cond:
            self._resolved += n
            self._failure = self._failure or why
            self._cond.notify_all()

    # -- I/O thread ----------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.5
        while not self._closing:
            opened = threading.Event()
            try:
                conn = pika.SelectConnection(
                    self.params,
                    on_open_callback=lambda c: self._on_open(c, opened),
                    on_open_error_callback=self._on_closed,
                    on_close_callback=self._on_closed,
                )
                self._connection = conn
                conn.ioloop.start()
            except Exception as exc:  # noqa: BLE001 - a client failure: log it, reconnect
                log.error("RabbitMQ I/O thread failed: %r; reconnecting", exc)
            self._connection = None
            if self._closing:
                break
            if opened.is_set():
                delay = 0.5
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _on_open(self, conn: Any, opened: threading.Event) -> None:
        opened.set()
        self._dropping = False
        conn.channel(on_open_callback=self._on_publisher)

    def _on_publisher(self, ch: Any) -> None:
        ch.confirm_delivery(self._on_confirm, callback=lambda _: self._set_publisher(ch))

    def _set_publisher(self, ch: Any) -> None:
        with self._cond:
            self._tags = self._confirmed = 0
        self._publisher = ch
        for q in self.queues.values():  # consume once outputs can go out
            self._connection.channel(on_open_callback=lambda c, q=q: self._on_consumer(c, q))

    def _on_consumer(self, ch: Any, q: _Queue) -> None:
        def consume(_: Any) -> None:
            ch.basic_consume(q.name, lambda c, m, p, b: self._on_message(q, m, b), auto_ack=False,
                             callback=lambda _: self._set_consumer(q, ch))

        ch.basic_qos(prefetch_count=self.prefetch, callback=consume)

    def _set_consumer(self, q: _Queue, ch: Any) -> None:
        q.channel = ch
        self._maybe_connected()

    def _maybe_connected(self) -> None:
        if self._publisher is not None and all(q.channel is not None for q in self.queues.values()):
            log.info("consuming from RabbitMQ", extra={"queues": list(self.queues)})
            self.connected.set()

    def _on_message(self, q: _Queue, method: Any, body: bytes) -> None:
        if self._dropping:
            return  # (the connection is being dropped: the broker redelivers it)
        q.inbox.append((body, method.delivery_tag, method.redelivered))
        if self._waiting:
            with self._cond:
                self._cond.notify()

    def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        ch = self._publisher
        if ch is None or not ch.is_open:
            self._give_up(len(messages), "the RabbitMQ connection dropped before the outputs were published")
            return
        publish = ch.basic_publish
        for queue, body in messages:
            publish("", queue, body, PERSISTENT)
        with self._cond:
            self._tags += len(messages)
            self._resolved += len(messages)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        with self._cond:
            if isinstance(method, pika.spec.Basic.Nack):
                self._failure = self._failure or "RabbitMQ refused (nacked) published outputs"
            self._confirmed = max(self._confirmed, method.delivery_tag)
            self._cond.notify_all()
        if isinstance(method, pika.spec.Basic.Nack):  # their records must come again: close, so that
            self._connection.close(reply_text="outputs nacked")  # the broker redelivers every unacked one

    def _ack(self, q: _Queue, tag: int, position: int, generation: int) -> None:
        ch = q.channel
        if ch is None or not ch.is_open or generation != self._generation:
            return  # tags of a connection gone: the broker redelivers them (the snapshot's window covers it)
        ch.basic_ack(tag, multiple=True)
        if self.fingerprints:
            ch.basic_qos(prefetch_count=self.prefetch, callback=lambda _: q.receipts.append(position))

    def _sample_ready(self, queues: list[_Queue]) -> None:
        for q in queues:
            ch = q.channel
            if ch is not None and ch.is_open:
                ch.queue_declare(q.name, passive=True,
                                 callback=lambda frame, q=q: setattr(q, "ready", frame.method.message_count))

    def _on_closed(self, conn: Any, exc: Any) -> None:
        if not self._closing:
            log.warning("RabbitMQ connection lost: %r; reconnecting", exc)
        self.connected.clear()
        self._publisher = None
        for q in self.queues.values():
            q.channel = None
            q.ready = None
            q.inbox.clear()  # (the broker redelivers them)
        with self._cond:
            self._generation += 1
            if self._confirmed < self._tags or self._resolved < self._handed:
                self._failure = self._failure or f"the RabbitMQ connection dropped with outputs unconfirmed ({exc!r})"
            self._resolved = max(self._resolved, self._handed)  # (publishes queued to this loop are lost with it)
            self._tags = self._confirmed = 0
            self._cond.notify_all()
        try:
            conn.ioloop.stop()
        except Exception:  # noqa: BLE001 - already stopping
            pass


class RabbitSource:
    """Shard queues in: every delivery of a queue, in order, with its position. Every
    ``ready_every`` seconds it samples how many messages wait in the queues it owns (the
    backlog: ``worker_rabbitmq_ready_messages``; deliveries it holds unacked are not counted)."""

    def __init__(self, connection: RabbitConnection, telemetry: Telemetry, ready_every: float = READY_EVERY):
        self.conn = connection
        self.telemetry = telemetry
        self.ready_every = ready_every
        self._listener: AssignmentListener | None = None
        self._assigned: list[str] = []
        self._generation = 0
        self._sampled = 0.0  # (monotonic) when the ready messages were last asked for

    def start(self, listener: AssignmentListener) -> None:
        self._listener = listener
        self.conn.start()
        if not self.conn.connected.wait(TIMEOUT):
            raise SourceError(f"cannot consume from RabbitMQ at {_safe(self.conn.url)} within {TIMEOUT:.0f} s")
        self.telemetry.set_ready(True)

    @property
    def exhausted(self) -> bool:
        return False

    def committed(self, shard: str) -> int | None:
        return None  # the broker keeps no position: outputs after a snapshot are published again

    def seek(self, shard: str, position: int) -> None:
        self.conn.queues[shard].reset(position, self._generation)

    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        assert self._listener is not None, "start() first"
        if self.conn.generation != self._generation:  # the connection dropped: every shard went with it
            self._generation = self.conn.generation
            lost, self._assigned = self._assigned, []
            self.telemetry.set_ready(False)
            if lost:
                log.warning("shards lost with the RabbitMQ connection", extra={"shards": lost})
                self._listener.on_lost(lost)
        if not self.telemetry.is_ready and self.conn.connected.is_set():
            self.telemetry.set_ready(True)
        batches = []
        fingerprints = self.conn.fingerprints
        for name, deliveries in self.conn.take(max_records, timeout).items():
            q = self.conn.queues[name]
            if name not in self._assigned:  # the broker made us its active consumer
                self._assigned.append(name)
                q.reset(0, self._generation)  # (the restore seeks it to the snapshot's position)
                q.dedup = None  # (the restore sets the snapshot's window)
                self._listener.on_assign([name])
            if q.dedup is not None:
                deliveries = self._dedup(q, deliveries)
                if not deliveries:
                    continue
            start = q.next_position
            values = [d[0] for d in deliveries]
            q.tags.extend(d[1] for d in deliveries)
            if fingerprints:
                q.prints.extend(map(fingerprint, values))
            q.next_position = start + len(values)
            batches.append(Batch(name, values, list(range(start, q.next_position))))
        if self._assigned and time.monotonic() - self._sampled >= self.ready_every:
            self._report_ready()
        return batches

    def _report_ready(self) -> None:
        """Publish the last sample of each owned queue's ready messages, and ask for the next."""
        self._sampled = time.monotonic()
        gauge = self.telemetry.rabbitmq_ready
        for name in self._assigned:
            ready = self.conn.queues[name].ready
            if ready is not None:
                gauge.labels(shard=name).set(ready)
        self.conn.sample_ready(list(self._assigned))

    def _dedup(self, q: _Queue, deliveries: list) -> list:
        d = q.dedup
        assert d is not None
        taken: list = []
        for i, delivery in enumerate(deliveries):
            taken.extend(d.feed(delivery, fingerprint(delivery[0])))
            if d.done:
                taken.extend(deliveries[i + 1 :])
                break
        if d.skipped:
            log.info("redelivered records the snapshot already has were acked, not learned",
                     extra={"shard": q.name, "records": len(d.skipped)})
            self.conn.ack(q.name, d.skipped[-1], q.next_position)
            d.skipped = []
        if d.done:
            q.dedup = None
        return taken

    def close(self) -> None:
        self.conn.close()


class RabbitSink:
    """Outputs to queues with publisher confirms; acks after confirms (no store) or after snapshots."""

    def __init__(self, connection: RabbitConnection, outputs: dict[str, str | None], ack_after_snapshot: bool,
                 commit_every: float):
        self.conn = connection
        self.outputs = outputs
        self.ack_after_snapshot = ack_after_snapshot
        self.commit_every = commit_every  # (the runtime's periodic commit: acks, without a store)

    def publish(self, outputs: Outputs) -> None:
        messages = [(queue, value) for kind, msgs in outputs.by_kind().items()
                    if msgs and (queue := self.outputs.get(kind)) for _, value in msgs]
        if messages:
            self.conn.publish(messages)

    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        """Every output so far is confirmed; without a store, ack the records below ``positions``.
        (With a store the periodic commit, ``wait=False``, has nothing to do: snapshots ack.)"""
        if self.ack_after_snapshot and not wait:
            return
        self.conn.wait_confirmed()
        if not self.ack_after_snapshot:
            for shard, position in positions.items():
                self._ack(shard, position)

    def snapshotted(self, shard: str, position: int) -> None:
        """A snapshot at ``position`` is durable: ack the records below it."""
        if self.ack_after_snapshot:
            self._ack(shard, position)

    def _ack(self, shard: str, position: int) -> None:
        q = self.conn.queues[shard]
        n = position - q.first
        if n <= 0:
            return
        tag = q.tags[n - 1]
        for _ in range(n):
            q.tags.popleft()
        q.first = position
        self.conn.ack(shard, tag, position)

    def checkpoint_state(self, shard: str, position: int) -> dict:
        """What the snapshot at ``position`` keeps to recognise redeliveries: the fingerprints of
        the records from the last ack known applied up to ``position``, and the points in it where
        an ack sent without a receipt ends."""
        q = self.conn.queues[shard]
        if not self.ack_after_snapshot:
            return {}
        deadline = time.monotonic() + 1.0  # a receipt takes a round trip: wait a little for it (shorter window)
        while q.sent and not q.receipts and time.monotonic() < deadline:
            time.sleep(0.001)
        q.settle()
        window = list(itertools.islice(q.prints, max(0, min(position, q.next_position) - q.applied)))
        return {"window": window, "cuts": [0, *(p - q.applied for p in q.sent if p < position)]}

    def restore(self, shard: str, state: dict) -> None:
        window = state.get("window") or []
        self.conn.queues[shard].dedup = _Dedup(window, state.get("cuts") or [0]) if window else None

    def close(self) -> None:
        pass  # the source closes the shared connection


class RecordPublisher:
    """Publishes records to an exchange with confirms, routing key = record key (the feeder's)."""

    def __init__(self, url: str):
        try:
            self._conn = pika.BlockingConnection(pika.URLParameters(url))
            self._channel = self._conn.channel()
            self._channel.confirm_delivery()
        except pika.exceptions.AMQPError as exc:
            raise SourceError(f"cannot connect to RabbitMQ at {_safe(url)}: {exc!r}") from exc

    def send(self, exchange: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        try:
            self._channel.basic_publish(exchange, (key or b"").decode(), value, PERSISTENT)
        except pika.exceptions.AMQPError as exc:
            raise SinkError(f"publishing to exchange {exchange!r} failed: {exc!r}") from exc

    def flush(self) -> None:
        """Every publish was confirmed already (one at a time); closes the connection."""
        try:
            self._conn.close()
        except pika.exceptions.AMQPError:
            pass


def open_rabbitmq(settings: Settings, telemetry: Telemetry) -> tuple[RabbitSource, RabbitSink]:
    r = settings.source.rabbitmq
    assert r is not None
    url = r.url.get_secret_value()
    queues = shard_queues(r.queue or r.exchange, r.shards)
    outputs = settings.outputs.model_dump()
    if r.declare:
        declare_topology(url, r.exchange, queues, [q for q in outputs.values() if q])
    store = settings.checkpoint.store is not None
    conn = RabbitConnection(url, queues, r.prefetch, fingerprints=store)
    sink = RabbitSink(conn, outputs, ack_after_snapshot=store, commit_every=r.commit_every_ms / 1000)
    return RabbitSource(conn, telemetry), sink
