"""This worker on Kafka, timed like every other contender (see :mod:`bench.harness`).

    python -m bench.worker_kafka --bootstrap HOST:PORT --topic IN --tag RUN --records N
        [--delivery exactly_once|at_least_once] [--idle-stop SECONDS] [--learner process|inline]
        [--cpu-affinity auto|split|none]

The worker's own ``Runtime``, ``KafkaSource``/``KafkaSink`` (``open_kafka``) and file
checkpoint store, started as ``worker run`` starts them (``gc.freeze()`` before the loop) and configured as a user would (StandardScaler | LogisticRegression,
probabilities, drift and metrics on, snapshots every 10,000 records, commits every 100 ms).
Two thin wrappers only observe: the source notes when the first record arrived and stops
the runtime after ``N`` records (or, with ``--idle-stop``, once nothing arrived for that
long: for several processes sharing a group); the sink notes when the last commit that
moved a position returned.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import REFERENCE_PIPELINE
from bench.harness import outputs, result
from worker.checkpoint import open_store
from worker.config import load_settings
from worker.learning import Engine
from worker.runtime import Runtime
from worker.transports.kafka import open_kafka


class _Observer:
    def __init__(self, records: int | None, idle_stop: float | None):
        self.target = records
        self.idle_stop = idle_stop
        self.records = 0
        self.first: float | None = None
        self.last_record = 0.0
        self.end: float | None = None
        self.runtime: Runtime | None = None


class TimedSource:
    """Delegates to the real source; stops the runtime once the records are all in.

    With a ``status`` path, the number of shards owned is written there after each assignment
    change (so a benchmark can wait for a group to settle).
    """

    def __init__(self, inner: Any, observer: _Observer, status: Path | None = None):
        self._inner, self._obs, self._status = inner, observer, status

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def start(self, listener: Any) -> None:
        self._listener = listener
        self._inner.start(self if self._status is not None else listener)

    def on_assign(self, shards: list[str]) -> None:
        self._listener.on_assign(shards)
        self._write_status()

    def on_revoke(self, shards: list[str]) -> None:
        try:
            self._listener.on_revoke(shards)
        finally:
            self._write_status()

    def on_lost(self, shards: list[str]) -> None:
        self._listener.on_lost(shards)
        self._write_status()

    def _write_status(self) -> None:
        self._status.write_text(str(len(self._listener.shards)))

    @property
    def exhausted(self) -> bool:
        return self._inner.exhausted

    def poll(self, max_records: int, timeout: float) -> list:
        batches = self._inner.poll(max_records, timeout)
        obs = self._obs
        n = sum(len(b.values) for b in batches)
        now = time.time()
        if n:
            if obs.first is None:
                obs.first = now
            obs.records += n
            obs.last_record = now
        done = obs.target is not None and obs.records >= obs.target
        idle = obs.idle_stop is not None and obs.first is not None and now - obs.last_record > obs.idle_stop
        if (done or idle) and obs.runtime is not None:
            obs.runtime.stop()
        return batches


class TimedSink:
    """Delegates to the real sink; notes when the last commit that moved a position returned.

    Periodic commits (``wait=False``) count too: in a run stopped by ``--idle-stop`` the
    last records are committed by one of them, and the commit at the stop, seconds later,
    moves nothing (counting only commits that wait had put the idle wait into the time).
    Such a commit has not finished when it returns: exactly-once, its transaction commits
    in the background (1-2 ms on a local broker); at-least-once, offsets of outputs not yet
    acknowledged go with a later call. A run stopped by ``--records`` ends with the commit
    at its stop, which waits and holds the last positions."""

    def __init__(self, inner: Any, observer: _Observer):
        self._inner, self._obs = inner, observer
        self._committed: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit(self, positions: dict[str, int], wait: bool = True) -> None:
        self._inner.commit(positions, wait=wait)
        if any(self._committed.get(k) != v for k, v in positions.items()):
            self._committed.update(positions)
            self._obs.end = time.time()


def run(bootstrap: str, topic: str, tag: str, records: int | None, delivery: str, store: str,
        consumer_config: dict, transactional_id: str | None = None, idle_stop: float | None = None,
        group: str | None = None, status: Path | None = None, batch_size: int | None = None,
        learner: str | None = None, polls_in_flight: int | None = None, cpu_affinity: str | None = None) -> _Observer:
    """Run the worker until ``records`` were consumed (or it idled ``idle_stop`` s); the observer
    holds when the first record arrived and when the last position-moving commit returned.
    ``batch_size``, ``polls_in_flight``: those ``limits``; ``learner``: ``process`` or ``inline``;
    ``cpu_affinity``: ``auto``, ``split`` or ``none`` (defaults: the worker's)."""
    limits = {k: v for k, v in (("batch_size", batch_size), ("polls_in_flight", polls_in_flight)) if v}
    settings = load_settings(
        data={
            "source": {"type": "kafka", "kafka": {
                "bootstrap_servers": bootstrap, "topics": [topic], "group_id": group or f"{tag}-group",
                "consumer": consumer_config, "transactional_id": transactional_id or f"{tag}-txn"}},
            "outputs": outputs(tag),
            "model": {"pipeline": REFERENCE_PIPELINE},
            "checkpoint": {"store": f"file://{store}"},
            "telemetry": {"port": None},
            "delivery": delivery,
            **({"limits": limits} if limits else {}),
            **({"learner": learner} if learner else {}),
            **({"cpu_affinity": cpu_affinity} if cpu_affinity else {}),
        },
        env={},
    )
    engine = Engine(settings)
    source, sink = open_kafka(settings, engine.telemetry)
    obs = _Observer(records, idle_stop)
    runtime = Runtime(engine, TimedSource(source, obs, status), TimedSink(sink, obs), open_store(settings.checkpoint.store))
    obs.runtime = runtime
    runtime.run()  # (it calls gc.freeze() before its loop, as under ``worker run``)
    return obs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--tag", required=True, help="names the group, the output topics and the transactional id")
    parser.add_argument("--records", type=int)
    parser.add_argument("--delivery", choices=["exactly_once", "at_least_once"], default="exactly_once")
    parser.add_argument("--store", required=True, help="checkpoint directory")
    parser.add_argument("--group", help="consumer group (default: TAG-group)")
    parser.add_argument("--transactional-id", help="default: TAG-txn (unique per process!)")
    parser.add_argument("--idle-stop", type=float, help="stop once no record arrived for this many seconds")
    parser.add_argument("--consumer-config", default="{}", help="extra consumer settings (JSON)")
    parser.add_argument("--status", type=Path, help="write the number of owned shards here on each assignment change")
    parser.add_argument("--batch-size", type=int, help="limits.batch_size (default: the worker's)")
    parser.add_argument("--learner", choices=["process", "inline"], help="where the model learns (default: the worker's)")
    parser.add_argument("--cpu-affinity", choices=["auto", "split", "none"], help="(default: the worker's)")
    args = parser.parse_args()
    obs = run(args.bootstrap, args.topic, args.tag, args.records, args.delivery, args.store,
              json.loads(args.consumer_config), args.transactional_id, args.idle_stop, args.group, args.status,
              args.batch_size, args.learner, cpu_affinity=args.cpu_affinity)
    result(obs.records, obs.first, obs.end)


if __name__ == "__main__":
    main()
