"""Smoke tests of the test RabbitMQ node in tests/brokers.py (the session's, see conftest.py).

What the RabbitMQ transport relies on, checked against the real broker:
publisher confirms, manual acks, a durable queue with ``x-single-active-consumer``
(a second consumer waits, then gets the unacked messages redelivered), a
``x-consistent-hash`` exchange (rabbitmq_consistent_hash_exchange) spreading
routing keys over 2 queues, and durable queues / persistent messages surviving
a SIGKILL of the node.

A broker that cannot be started skips these tests, except under CI=true,
where it fails them.
"""

from __future__ import annotations

import time
import uuid

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

pytestmark = pytest.mark.integration

WAIT = 30.0  # bound on every consume loop, seconds
SAC = {"x-single-active-consumer": True}
PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
TRANSIENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Transient)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _channel(conn):
    ch = conn.channel()
    ch.confirm_delivery()  # basic_publish now waits for the broker's ack (NackError/UnroutableError)
    return ch


def _publish(ch, bodies, *, exchange="", routing_key="", keys=None, props=PERSISTENT) -> None:
    for i, body in enumerate(bodies):
        rk = keys[i] if keys is not None else routing_key
        ch.basic_publish(exchange, rk, body.encode(), properties=props, mandatory=True)


def _count(ch, queue: str) -> int:
    return ch.queue_declare(queue, passive=True).method.message_count


def _receive(ch, queue: str, n: int, timeout: float = WAIT) -> list[tuple[str, bool]]:
    """Up to ``n`` deliveries of ``queue``, each acked: [(body, redelivered)]."""
    got = []
    deadline = time.monotonic() + timeout
    for method, _props, body in ch.consume(queue, inactivity_timeout=0.1):
        if method is not None:
            got.append((body.decode(), method.redelivered))
            ch.basic_ack(method.delivery_tag)
        if len(got) >= n or time.monotonic() > deadline:
            break
    ch.cancel()
    return got


def test_confirmed_publish_manual_ack(rabbitmq):
    q = _name("q")
    with rabbitmq.connection() as conn:
        ch = _channel(conn)
        ch.queue_declare(q, durable=True, arguments=SAC)
        _publish(ch, [f"m{i}" for i in range(10)], routing_key=q)
        assert _count(ch, q) == 10
        got = _receive(ch, q, 10)
        assert got == [(f"m{i}", False) for i in range(10)]
        assert _count(ch, q) == 0
        ch.queue_delete(q)


def test_unroutable_mandatory_publish_is_returned(rabbitmq):
    """With confirms + mandatory, a publish to nowhere raises instead of vanishing."""
    with rabbitmq.connection() as conn:
        ch = _channel(conn)
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", _name("nowhere"), b"x", properties=PERSISTENT, mandatory=True)


def test_consistent_hash_exchange_two_queues(rabbitmq):
    ex, q1, q2 = _name("hash"), _name("q1"), _name("q2")
    keys = [f"key-{i}" for i in range(100)]
    with rabbitmq.connection() as conn:
        ch = _channel(conn)
        ch.exchange_declare(ex, exchange_type="x-consistent-hash", durable=True)
        for q in (q1, q2):
            ch.queue_declare(q, durable=True, arguments=SAC)
            ch.queue_bind(q, ex, routing_key="1")  # the binding key is the queue's weight
        # every key twice: both copies must land in the same queue
        _publish(ch, [f"{k}|{r}" for r in range(2) for k in keys], exchange=ex, keys=keys * 2)
        n1, n2 = _count(ch, q1), _count(ch, q2)
        assert n1 + n2 == 200
        assert n1 > 20 and n2 > 20, f"hash spread too uneven: {n1} / {n2}"
        where: dict[str, set[str]] = {}
        for q, n in ((q1, n1), (q2, n2)):
            for body, _ in _receive(ch, q, n):
                where.setdefault(body.split("|")[0], set()).add(q)
        assert sorted(where) == sorted(keys)
        assert all(len(qs) == 1 for qs in where.values()), "a routing key went to both queues"
        ch.exchange_delete(ex)
        ch.queue_delete(q1)
        ch.queue_delete(q2)


def test_single_active_consumer_takes_over_unacked(rabbitmq):
    q = _name("sac")
    with rabbitmq.connection() as setup:
        ch = _channel(setup)
        ch.queue_declare(q, durable=True, arguments=SAC)
        _publish(ch, [f"m{i}" for i in range(5)], routing_key=q)

    first = rabbitmq.connection()
    second = rabbitmq.connection()
    try:
        ch1 = first.channel()
        ch1.basic_qos(prefetch_count=10)
        got1 = []
        deadline = time.monotonic() + WAIT
        for method, _props, body in ch1.consume(q, inactivity_timeout=0.1):
            if method is not None:
                got1.append((method.delivery_tag, body.decode(), method.redelivered))
            if len(got1) == 5 or time.monotonic() > deadline:
                break
        assert [(b, r) for _, b, r in got1] == [(f"m{i}", False) for i in range(5)]
        for tag, _, _ in got1[:2]:  # ack m0, m1; m2..m4 stay unacked on the first consumer
            ch1.basic_ack(tag)

        # The second consumer registers while the first is alive: it gets nothing.
        ch2 = second.channel()
        ch2.basic_qos(prefetch_count=10)
        idle = []
        deadline = time.monotonic() + 2.0
        for method, _props, body in ch2.consume(q, inactivity_timeout=0.1):
            if method is not None:
                idle.append(body.decode())
            if time.monotonic() > deadline:
                break
        assert idle == [], f"second consumer got {idle} while the first was active"

        first.close()  # the first consumer dies with m2..m4 unacked

        got2 = []
        deadline = time.monotonic() + WAIT
        for method, _props, body in ch2.consume(q, inactivity_timeout=0.1):
            if method is not None:
                got2.append((body.decode(), method.redelivered))
                ch2.basic_ack(method.delivery_tag)
            if len(got2) >= 3 or time.monotonic() > deadline:
                break
        assert got2 == [("m2", True), ("m3", True), ("m4", True)]
        ch2.cancel()
        ch2.queue_delete(q)
    finally:
        for conn in (first, second):
            if conn.is_open:
                conn.close()


def test_hard_restart_keeps_durable_queues_and_persistent_messages(rabbitmq):
    durable, transient_q, ex = _name("durable"), _name("transient"), _name("hash")
    with rabbitmq.connection() as conn:
        ch = _channel(conn)
        ch.queue_declare(durable, durable=True, arguments=SAC)
        ch.queue_declare(transient_q, durable=False)
        ch.exchange_declare(ex, exchange_type="x-consistent-hash", durable=True)
        ch.queue_bind(durable, ex, routing_key="1")
        _publish(ch, [f"p{i}" for i in range(10)], routing_key=durable)  # confirmed = on disk
        _publish(ch, ["t0", "t1"], routing_key=durable, props=TRANSIENT)
        _publish(ch, ["x"], routing_key=transient_q)
        assert _count(ch, durable) == 12

    port, pid = rabbitmq.port, rabbitmq.pid
    rabbitmq.restart(hard=True)  # SIGKILL: no clean shutdown
    assert rabbitmq.port == port and rabbitmq.pid != pid

    with rabbitmq.connection() as conn:
        ch = _channel(conn)
        # the queue and its arguments are back: an equal declare is fine, another one is refused
        ch.queue_declare(durable, durable=True, arguments=SAC)
        assert _count(ch, durable) == 10, "persistent messages kept, transient ones dropped"
        with pytest.raises(ChannelClosedByBroker) as exc:
            ch.queue_declare(durable, durable=True)
        assert exc.value.reply_code == 406
        ch = _channel(conn)
        with pytest.raises(ChannelClosedByBroker) as exc:
            ch.queue_declare(transient_q, passive=True)
        assert exc.value.reply_code == 404, "a non-durable queue does not survive a restart"
        ch = _channel(conn)
        # the durable exchange and its binding survived too
        _publish(ch, ["via-exchange"], exchange=ex, routing_key="any-key")
        got = [body for body, _ in _receive(ch, durable, 11)]
        assert got == [f"p{i}" for i in range(10)] + ["via-exchange"]
        ch.queue_delete(durable)
        ch.exchange_delete(ex)
