"""This worker on RabbitMQ, timed like every other contender (see :mod:`bench.harness`).

    python -m bench.worker_rabbitmq --url AMQP_URL --exchange EX --tag RUN --records N --store DIR
        [--shards 1] [--prefetch P] [--learner process|inline]

The worker's own ``Runtime``, ``RabbitSource``/``RabbitSink`` (``open_rabbitmq``) and file
checkpoint store, configured as a user would (StandardScaler | LogisticRegression,
probabilities, drift and metrics on their defaults, ``delivery: at_least_once``, snapshots
every 10,000 records, the transport's default prefetch), reading the shard queues
``EX.0`` .. (pre-filled through the ``x-consistent-hash`` exchange ``EX``) and publishing
to the output queues ``RUN-predictions``, ``RUN-metrics``, ``RUN-drift`` (declared by
the worker at start). With a store, a delivery is acked once a durable snapshot covers it.

Two thin wrappers only observe: the source (:class:`bench.worker_kafka.TimedSource`) notes
when the first record arrived and stops the runtime after ``N`` records; the sink notes
when the ack that covers all ``N`` records was handed to the connection (the stop's
snapshot, after the commit that waits for every publisher confirm). ``seconds`` spans the two.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import REFERENCE_PIPELINE
from bench.harness import outputs, result
from bench.worker_kafka import TimedSource, _Observer
from worker.checkpoint import open_store
from worker.config import load_settings
from worker.learning import Engine
from worker.runtime import Runtime
from worker.transports.rabbitmq import open_rabbitmq


class AckTimedSink:
    """Delegates to the real sink; notes when the records acked (through durable snapshots,
    or through commits without a store) first reach the target."""

    def __init__(self, inner: Any, observer: _Observer):
        self._inner, self._obs = inner, observer
        self._acked: dict[str, int] = {}
        self.commit_every = inner.commit_every  # (read once by the runtime)
        self.snapshotted = self._snapshotted if inner.ack_after_snapshot else None  # (read once by the runtime)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        self._inner.commit(positions, wait=wait)
        if not self._inner.ack_after_snapshot:
            self._note(positions)

    def _snapshotted(self, shard: str, position: int) -> None:
        self._inner.snapshotted(shard, position)
        self._note({shard: position})

    def _note(self, positions: dict[str, int]) -> None:
        self._acked.update(positions)
        obs = self._obs
        if obs.end is None and obs.target is not None and sum(self._acked.values()) >= obs.target:
            obs.end = time.time()


def settings(url: str, exchange: str, tag: str, store: str | None, shards: int = 1, prefetch: int | None = None,
             learner: str | None = None, batch_size: int | None = None) -> Any:
    rabbit = {"url": url, "exchange": exchange, "shards": shards, **({"prefetch": prefetch} if prefetch else {})}
    return load_settings(
        data={
            "source": {"type": "rabbitmq", "rabbitmq": rabbit},
            "outputs": outputs(tag),
            "model": {"pipeline": REFERENCE_PIPELINE},
            "checkpoint": {"store": f"file://{store}" if store else None},
            "telemetry": {"port": None},
            "delivery": "at_least_once",
            **({"learner": learner} if learner else {}),
            **({"limits": {"batch_size": batch_size}} if batch_size else {}),
        },
        env={},
    )


def run(url: str, exchange: str, tag: str, records: int, store: str | None, shards: int = 1,
        prefetch: int | None = None, learner: str | None = None, batch_size: int | None = None) -> _Observer:
    """Run the worker until ``records`` were consumed; the observer holds when the first record
    arrived and when the ack covering all of them was sent."""
    s = settings(url, exchange, tag, store, shards, prefetch, learner, batch_size)
    engine = Engine(s)
    source, sink = open_rabbitmq(s, engine.telemetry)
    obs = _Observer(records, None)
    store_ = open_store(s.checkpoint.store) if store else None
    runtime = Runtime(engine, TimedSource(source, obs), AckTimedSink(sink, obs), store_)
    obs.runtime = runtime
    runtime.run()  # (it calls gc.freeze() before its loop, as under ``worker run``)
    return obs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True, help="the x-consistent-hash exchange (shard queues EXCHANGE.i)")
    parser.add_argument("--tag", required=True, help="names the output queues")
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--store", help="checkpoint directory (without: no store, acks after confirms)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--prefetch", type=int, help="source.rabbitmq.prefetch (default: the worker's)")
    parser.add_argument("--learner", choices=["process", "inline"], help="where the model learns (default: the worker's)")
    parser.add_argument("--batch-size", type=int, help="limits.batch_size (default: the worker's)")
    args = parser.parse_args()
    obs = run(args.url, args.exchange, args.tag, args.records, args.store, args.shards, args.prefetch, args.learner,
              args.batch_size)
    result(obs.records, obs.first, obs.end)


if __name__ == "__main__":
    main()
