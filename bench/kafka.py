"""The worker on Kafka (embedded tansu) as a ratio of the plain river loop, in one run.

    python -m bench.kafka [--records 30000] [--repeat 3] [--bootstrap HOST:PORT]

For each repetition, on the same Agrawal records (StandardScaler | LogisticRegression):
the plain loop over pre-decoded dicts, then the worker with ``exactly_once`` and with
``at_least_once`` reading the JSON records from a 1-partition topic, publishing a
prediction per record (plus metrics and drift events) and committing every 100 ms, with a
snapshot every 10,000 records. The worker's time runs from its first consumed batch to
the moment the last record's outputs are committed (group joins are not counted).
Ratios are plain / worker; the median over the repetitions is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import REFERENCE_PIPELINE, agrawal, pin_hash_seed, plain_loop
from worker.checkpoint import FileStore
from worker.config import load_settings
from worker.embedded import CONSUMER_OVERRIDES, EmbeddedBroker
from worker.feeder import feed
from worker.learning import Engine
from worker.runtime import Runtime
from worker.transports.kafka import create_topics, open_kafka


class _Timed:
    """Wraps the source: starts the clock at the first records, stops the runtime after ``n``."""

    def __init__(self, inner, n: int):
        self.inner = inner
        self.n = n
        self.seen = 0
        self.first: float | None = None
        self.runtime: Runtime | None = None

    def poll(self, max_records: int, timeout: float):
        batches = self.inner.poll(max_records, timeout)
        if batches and self.first is None:
            self.first = time.perf_counter()
        self.seen += sum(len(b.values) for b in batches)
        if self.seen >= self.n and self.runtime is not None:
            self.runtime.stop()
        return batches

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def worker_run(bootstrap: str, topic: str, n: int, delivery: str, workdir: Path, batch: int) -> float:
    tag = uuid.uuid4().hex[:8]
    outs = {k: f"{k}-{tag}" for k in ("predictions", "drift", "metrics", "dead_letter")}
    create_topics(bootstrap, outs.values(), partitions=1)
    state = workdir / f"state-{tag}"
    settings = load_settings(
        data={
            "source": {"type": "kafka", "kafka": {
                "bootstrap_servers": bootstrap, "topics": [topic], "group_id": f"bench-{tag}",
                "consumer": dict(CONSUMER_OVERRIDES), "transactional_id": f"bench-{tag}",
            }},
            "outputs": outs,
            "model": {"task": "classification", "pipeline": REFERENCE_PIPELINE},
            "checkpoint": {"store": f"file://{state}", "every_records": 10000, "every_seconds": 60},
            "limits": {"batch_size": batch},
            "telemetry": {"port": None},
            "delivery": delivery,
        },
        env={},
    )
    engine = Engine(settings)
    source, sink = open_kafka(settings, engine.telemetry)
    timed = _Timed(source, n)
    runtime = Runtime(engine, timed, sink, FileStore(state))
    timed.runtime = runtime
    ended: list[float] = []
    close = source.close

    def close_and_time() -> None:  # the final commit + snapshot happened just before
        ended.append(time.perf_counter())
        close()

    timed.close = close_and_time  # type: ignore[method-assign]
    gc.freeze()  # as `worker run` does before its loop
    try:
        runtime.run()
    finally:
        gc.unfreeze()
    assert timed.first is not None and ended, "the worker consumed nothing"
    shutil.rmtree(state, ignore_errors=True)
    return ended[0] - timed.first


def main() -> None:
    pin_hash_seed("bench.kafka")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2000, help="limits.batch_size (records per consume)")
    parser.add_argument("--bootstrap", help="an existing broker (default: start tansu)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    records = agrawal(args.records)
    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    results: dict[str, list[float]] = {"exactly_once": [], "at_least_once": []}
    times: dict[str, list[float]] = {"plain": [], "exactly_once": [], "at_least_once": []}
    with contextlib.ExitStack() as stack:
        bootstrap = args.bootstrap or stack.enter_context(EmbeddedBroker(workdir / "tansu")).bootstrap
        topic = f"bench-in-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic], partitions=1)
        feed(bootstrap, topic, ({"id": i, "x": x, "y": y} for i, (x, y) in enumerate(records)))
        for _ in range(args.repeat):
            for delivery in ("exactly_once", "at_least_once"):
                p = plain_loop(records)
                w = worker_run(bootstrap, topic, args.records, delivery, workdir, args.batch)
                times["plain"].append(p)
                times[delivery].append(w)
                results[delivery].append(p / w)
    shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "benchmark": "kafka (tansu)",
        "records": args.records,
        "plain_records_per_s": args.records / statistics.median(times["plain"]),
        **{f"{d}_records_per_s": args.records / statistics.median(times[d]) for d in results},
        **{f"{d}_ratio": {"median": statistics.median(r), "min": min(r), "max": max(r)} for d, r in results.items()},
    }
    print(f"plain river loop: {summary['plain_records_per_s']:,.0f} rec/s")
    for d, r in results.items():
        print(f"worker {d:<14} {summary[f'{d}_records_per_s']:,.0f} rec/s   ratio median {statistics.median(r):.3f} "
              f"(min {min(r):.3f}, max {max(r):.3f}, n={len(r)})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
