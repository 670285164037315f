"""The RabbitMQ transport's redelivery window (no broker: the integration tests use a real one)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.transports.rabbitmq import _Dedup, _safe, fingerprint


def _run(window: list[int], cuts: list[int], queue: list[tuple[bytes, bool]], polls: int) -> tuple[list, int]:
    """Feed ``queue`` (body, redelivered) in ``polls`` slices; (bodies taken, records dropped)."""
    d = _Dedup([fingerprint(b) for b in window], cuts)
    deliveries = [(body, tag, redelivered) for tag, (body, redelivered) in enumerate(queue, 1)]
    taken, dropped = [], 0
    size = max(1, len(deliveries) // polls)
    for start in range(0, len(deliveries), size):
        for i, delivery in enumerate(deliveries[start:start + size]):
            if d.done:
                taken.append(delivery)
                continue
            taken += d.feed(delivery, fingerprint(delivery[0]))
        dropped += len(d.skipped)
        d.skipped = []  # (the source acks them after each poll)
    return [t[0] for t in taken], dropped


@given(n=st.integers(1, 40), acked=st.integers(0, 40), extra=st.integers(0, 20), polls=st.integers(1, 7))
def test_the_queue_resumes_right_after_the_snapshot_wherever_the_ack_ended(n, acked, extra, polls):
    """Records 0..n-1 are in the snapshot; an ack up to ``acked`` (a cut) may or may not have
    been applied; the queue holds everything after it (redelivered) and ``extra`` new ones."""
    acked = min(acked, n)
    records = [b"r%d" % i for i in range(n + extra)]
    queue = [(body, True) for body in records[acked:n]] + [(body, i % 2 == 0) for i, body in enumerate(records[n:])]
    taken, dropped = _run(records[:n], sorted({0, acked}), queue, polls)
    assert taken == records[n:]
    assert dropped == n - acked


def test_records_that_were_never_delivered_are_never_dropped():
    taken, dropped = _run([b"a", b"b"], [0], [(b"a", False), (b"b", False)], 1)
    assert (taken, dropped) == ([b"a", b"b"], 0)


def test_a_partial_match_is_released_in_order_when_the_queue_differs():
    taken, dropped = _run([b"a", b"b", b"c"], [0], [(b"a", True), (b"b", True), (b"x", True)], 3)
    assert (taken, dropped) == ([b"a", b"b", b"x"], 0)


def test_urls_are_shown_without_their_password():
    assert _safe("amqp://user:s3cret@host:5672/%2F") == "amqp://user:***@host:5672/%2F"
    assert _safe("amqp://host") == "amqp://host"
