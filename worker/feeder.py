"""The feeder behind ``worker produce``: a river synthetic stream with a concept change.

Records look like ``{"id": i, "key": "k3", "x": {...}, "y": 0}``. The stream is Agrawal
(classification function 0) that turns, around record ``drift_at``, into Agrawal with
another classification function (river's ``ConceptDriftStream``), so a drift detector
watching the error stream has something to find.

>>> recs = list(synthetic(3, seed=1, keys=2))
>>> [r["id"] for r in recs], [r["key"] for r in recs], sorted(recs[0]["x"])[:3]
([0, 1, 2], ['k0', 'k1', 'k0'], ['age', 'car', 'commission'])
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import orjson
from river.datasets import synth


def synthetic(
    n: int, seed: int = 42, drift_at: int | None = None, width: int | None = None, keys: int = 0, functions: tuple[int, int] = (0, 4)
) -> Iterator[dict]:
    """``n`` Agrawal records; the concept changes at ``drift_at`` (default: half-way)."""
    position = max(n // 2 if drift_at is None else drift_at, 1)
    # river's sigmoid overflows when position / width > ~170: keep the change sharp but finite
    width = max(width or 1, position // 100 + 1)
    stream = synth.ConceptDriftStream(
        stream=synth.Agrawal(classification_function=functions[0], seed=seed),
        drift_stream=synth.Agrawal(classification_function=functions[1], seed=seed + 1),
        position=position,
        width=width,
        seed=seed,
    )
    for i, (x, y) in enumerate(itertools.islice(stream, n)):
        rec: dict = {"id": i, "x": x, "y": int(y)}
        if keys:
            rec["key"] = f"k{i % keys}"
        yield rec


def feed(
    bootstrap: str,
    topic: str,
    records: Iterator[dict],
    rate: float | None = None,
    partitions: int | None = None,
    stop: object = None,
    producer: object = None,
) -> int:
    """Send records (keyed by ``key`` when present; round-robin over ``partitions`` if given).

    ``rate``: records per second (None: as fast as possible). ``stop``: a
    ``threading.Event``-like object that ends the feed early. ``producer``: send through this
    one (``send(topic, value, key, partition)``, ``flush()``; e.g. a RabbitMQ
    :class:`~worker.transports.rabbitmq.RecordPublisher`) instead of a Kafka producer to
    ``bootstrap``. Returns the number sent.
    """
    if producer is None:
        from worker.transports.kafka import RecordProducer

        producer = RecordProducer(bootstrap)
    started = time.monotonic()
    sent = 0
    for rec in records:
        if stop is not None and stop.is_set():  # type: ignore[attr-defined]
            break
        key = rec.get("key")
        producer.send(  # type: ignore[attr-defined]
            topic,
            orjson.dumps(rec),
            key.encode() if key is not None else None,
            partition=None if not partitions else sent % partitions,
        )
        sent += 1
        if rate:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush()  # type: ignore[attr-defined]
    return sent
