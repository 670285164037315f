"""The plain asynchronous pika loop a competent engineer writes, timed like every other contender.

    python -m bench.pika_loop --url AMQP_URL --queue IN --out OUT --records N [--prefetch 1000]

One ``pika.SelectConnection``, two channels: one consumes ``IN`` with manual acks and a
prefetch, the other publishes with publisher confirms. For each delivery: ``orjson.loads``,
``predict_proba_one`` (the prediction is its most likely class) then ``learn_one``
(StandardScaler | LogisticRegression, built from :data:`bench.common.REFERENCE_PIPELINE`
as the worker builds it), and ``{"id", "prediction", "proba"}`` published persistent to
``OUT`` through the default exchange. Confirms are handled asynchronously (a callback,
never a wait per message): when the broker confirms the outputs up to some publish, the
input deliveries whose outputs are all confirmed are acked with one ``basic_ack(multiple=True)``.
A nack ends the run with an error (a real service would requeue; none happens here).

No checkpoints, no metrics, no drift, no dead letters, no reconnection. Prints the
harness's result line (:func:`bench.harness.result`) once ``N`` records are processed,
their outputs confirmed and their deliveries acked: ``seconds`` runs from the first
delivery to that last ack.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import orjson
import pika
import pika.spec

from bench.common import REFERENCE_PIPELINE
from bench.harness import result
from worker.config import ModelSettings
from worker.models import build_model

PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")


class PikaLoop:
    def __init__(self, url: str, queue: str, out: str, records: int, prefetch: int):
        self.params = pika.URLParameters(url)
        self.queue, self.out, self.target, self.prefetch = queue, out, records, prefetch
        model = build_model(ModelSettings(pipeline=REFERENCE_PIPELINE))
        self.predict, self.learn = model.predict_proba_one, model.learn_one
        self.conn: pika.SelectConnection | None = None
        self.publisher = self.consumer = None
        self.seen = self.published = self.confirmed = self.acked = 0
        self.pending: collections.deque[tuple[int, int]] = collections.deque()  # (publish seq, delivery tag)
        self.early: set[int] = set()  # confirms of single publishes ahead of `confirmed`
        self.first: float | None = None
        self.end: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        self.conn = pika.SelectConnection(self.params, on_open_callback=self._on_open,
                                          on_open_error_callback=self._on_failed, on_close_callback=self._on_failed)
        self.conn.ioloop.start()

    def _on_open(self, conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_publisher)

    def _on_publisher(self, ch) -> None:
        self.publisher = ch
        ch.confirm_delivery(self._on_confirm, callback=lambda _: self.conn.channel(on_open_callback=self._on_consumer))

    def _on_consumer(self, ch) -> None:
        self.consumer = ch
        ch.basic_qos(prefetch_count=self.prefetch,
                     callback=lambda _: ch.basic_consume(self.queue, self._on_message, auto_ack=False))

    def _on_message(self, ch, method, properties, body: bytes) -> None:
        if self.first is None:
            self.first = time.time()
        rec = orjson.loads(body)
        x = rec["x"]
        proba = self.predict(x)
        prediction = max(proba, key=proba.get) if proba else None
        self.learn(x, rec["y"])
        self.publisher.basic_publish("", self.out, orjson.dumps(
            {"id": rec["id"], "prediction": prediction, "proba": proba}, option=orjson.OPT_NON_STR_KEYS), PERSISTENT)
        self.published += 1
        self.pending.append((self.published, method.delivery_tag))
        self.seen += 1

    def _on_confirm(self, frame) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._fail(f"the broker nacked output {method.delivery_tag}")
            return
        if method.multiple:
            self.confirmed = max(self.confirmed, method.delivery_tag)
            self.early = {t for t in self.early if t > self.confirmed} if self.early else self.early
        elif method.delivery_tag > self.confirmed:
            self.early.add(method.delivery_tag)
        while self.confirmed + 1 in self.early:  # single confirms out of order: advance over them
            self.confirmed += 1
            self.early.discard(self.confirmed)
        tag = None
        while self.pending and self.pending[0][0] <= self.confirmed:
            tag = self.pending.popleft()[1]
            self.acked += 1
        if tag is not None:
            self.consumer.basic_ack(tag, multiple=True)
            if self.acked >= self.target:
                self.end = time.time()
                self.conn.close()

    def _fail(self, why: str) -> None:
        self.error = why
        if self.conn.is_open:
            self.conn.close()

    def _on_failed(self, conn, exc) -> None:
        if self.end is None and self.error is None:
            self.error = f"connection closed: {exc!r}"
        conn.ioloop.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True, help="the input queue (pre-filled)")
    parser.add_argument("--out", required=True, help="the output queue (declared by the caller)")
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=1000)
    args = parser.parse_args()
    loop = PikaLoop(args.url, args.queue, args.out, args.records, args.prefetch)
    loop.run()
    if loop.end is None:
        sys.exit(f"pika loop: {loop.error or 'stopped early'} after {loop.acked} acked records")
    result(loop.acked, loop.first, loop.end)


if __name__ == "__main__":
    main()
