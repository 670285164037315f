"""The worker on Kafka (embedded tansu) as a ratio of the plain river loop, in one run.

    python -m bench.kafka [--records 30000] [--repeat 3] [--bootstrap HOST:PORT] [--cpu]
                          [--in-flight 1,2] [--affinity none,split] [--broker-anywhere]

The worker's learner calls a simple pipeline's steps directly (:func:`worker.models.calls`),
which spares river's pipeline dispatch; the plain loop calls the pipeline as a user would.
The same loop calling the steps directly is timed too and printed beside it, so that what
the ratio owes to that can be told apart.

For each repetition, on the same Agrawal records (StandardScaler | LogisticRegression):
the plain loop over pre-decoded dicts, then the worker with ``exactly_once`` and with
``at_least_once`` reading the JSON records from a 1-partition topic, publishing a
prediction per record (plus metrics and drift events) and committing every 100 ms, with a
snapshot every 10,000 records. The worker is :func:`bench.worker_kafka.run`, the one the
suite's contenders run; its time runs from its first consumed batch to the return of its
last commit that moved a position (group joins are not counted).
Ratios are plain / worker, the plain loop timed right before and right after each worker run
(the mean of the two; see :mod:`bench.contenders`); the median over the repetitions is reported. ``--in-flight 1,2``
runs the worker with each of those ``limits.polls_in_flight`` in turn, in every repetition
(an A/B in one run); ``--affinity`` likewise with ``cpu_affinity`` (default: ``split``, as
in the suite: :data:`bench.common.WORKER_AFFINITY`). The tansu started here runs off the
learner's CPU, as in the suite (:func:`bench.harness.off_learner_cpus`); ``--broker-anywhere``
lets it run anywhere.

With ``--cpu`` each worker run also prints where the CPU went in that window
(:mod:`bench.cpu`): this process's main thread and librdkafka's threads, the learner
child, and tansu (an external ``--bootstrap`` broker is not counted), in µs per record and
in cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

from bench import worker_kafka
from bench.common import WORKER_AFFINITY, agrawal, pin_hash_seed, plain_loop
from bench.cpu import CpuSampler
from bench.harness import interruptible, off_learner_cpus, outputs, start_broker, stop_broker
from worker.embedded import CONSUMER_OVERRIDES
from worker.feeder import feed
from worker.transports.kafka import create_topics


def worker_run(bootstrap: str, topic: str, n: int, delivery: str, workdir: Path, batch: int,
               cpu_roles: dict[int, str] | None = None, in_flight: int | None = None,
               affinity: str = WORKER_AFFINITY) -> tuple[float, list[dict] | None]:
    """Seconds from the worker's first consumed batch to its last position-moving commit
    (:func:`bench.worker_kafka.run`, in this process, as the suite's contenders run it), and
    with ``cpu_roles`` ({pid: role} of other children, e.g. the broker) the CPU breakdown of
    that window (:meth:`bench.cpu.CpuSampler.breakdown`)."""
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, outputs(tag).values(), partitions=1)
    store = workdir / f"state-{tag}"
    with contextlib.ExitStack() as stack:
        cpu = stack.enter_context(CpuSampler(roles=cpu_roles)) if cpu_roles is not None else None
        try:
            obs = worker_kafka.run(bootstrap, topic, tag, n, delivery, str(store), dict(CONSUMER_OVERRIDES),
                                   batch_size=batch, polls_in_flight=in_flight, cpu_affinity=affinity)
        finally:
            shutil.rmtree(store, ignore_errors=True)
    assert obs.first is not None and obs.end is not None, "the worker consumed or committed nothing"
    return obs.end - obs.first, None if cpu is None else cpu.breakdown(obs.first, obs.end)


def print_cpu(label: str, n: int, wall: float, rows: list[dict]) -> None:
    """One worker run's CPU breakdown, per record and in cores."""
    print(f"  {label}: {wall * 1e6 / n:.1f} µs/record wall, CPU by process and thread:")
    for r in rows:
        print(f"    {r['role']:<7} {r['thread']:<18} {r['cpu_s'] * 1e6 / n:6.2f} µs/record  {r['share']:.2f} cores")
    print(f"    {'total':<26} {sum(r['cpu_s'] for r in rows) * 1e6 / n:6.2f} µs/record  "
          f"{sum(r['share'] for r in rows):.2f} cores")


def main() -> None:
    pin_hash_seed("bench.kafka")
    interruptible()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2000, help="limits.batch_size (records per consume)")
    parser.add_argument("--in-flight", help="limits.polls_in_flight, or several (1,2) to alternate (default: the worker's)")
    parser.add_argument("--affinity", default=WORKER_AFFINITY,
                        help=f"cpu_affinity, or several (none,split) to alternate (default: {WORKER_AFFINITY})")
    parser.add_argument("--bootstrap", help="an existing broker (default: start tansu)")
    parser.add_argument("--broker-anywhere", action="store_true",
                        help="let the tansu started here run on any CPU (default: off the learner's, as in the "
                             "suite: bench.harness.off_learner_cpus)")
    parser.add_argument("--cpu", action="store_true", help="print each worker run's CPU by process and thread (Linux)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    depths = [int(d) for d in args.in_flight.split(",")] if args.in_flight else [None]
    affinities = args.affinity.split(",")
    # (name, delivery, polls in flight, affinity): the name carries a setting only when several are compared
    runs = [(" ".join([d, *([f"in_flight={k}"] if len(depths) > 1 else []),
                       *([f"affinity={a}"] if len(affinities) > 1 else [])]), d, k, a)
            for d in ("exactly_once", "at_least_once") for k in depths for a in affinities]
    records = agrawal(args.records)
    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    results: dict[str, list[float]] = {name: [] for name, *_ in runs}
    times: dict[str, list[float]] = {"plain": [], "direct": [], **{name: [] for name, *_ in runs}}
    cpu: dict[str, list[list[dict]]] = {name: [] for name, *_ in runs}
    with contextlib.ExitStack() as stack:
        broker = None
        if not args.bootstrap:
            broker = start_broker("tansu", None if args.broker_anywhere else off_learner_cpus("tansu"))
            stack.callback(stop_broker, broker)
        bootstrap = args.bootstrap or broker.bootstrap
        roles = None if not args.cpu else ({} if broker is None else {broker.pid: "broker"})
        topic = f"bench-in-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic], partitions=1)
        feed(bootstrap, topic, ({"id": i, "x": x, "y": y} for i, (x, y) in enumerate(records)))
        before = plain_loop(records)
        for _ in range(args.repeat):
            for name, delivery, depth, affinity in runs:
                w, rows = worker_run(bootstrap, topic, args.records, delivery, workdir, args.batch, roles, depth, affinity)
                after = plain_loop(records)  # (the plain loop around each run: see bench.contenders)
                p, before = (before + after) / 2, after
                times["direct"].append(plain_loop(records, direct=True))
                if rows is not None:
                    print_cpu(name, args.records, w, rows)
                    cpu[name].append(rows)
                times["plain"].append(p)
                times[name].append(w)
                results[name].append(p / w)
    shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "benchmark": "kafka (tansu)",
        "records": args.records,
        "plain_records_per_s": args.records / statistics.median(times["plain"]),
        "direct_records_per_s": args.records / statistics.median(times["direct"]),
        **{f"{d}_records_per_s": args.records / statistics.median(times[d]) for d in results},
        **{f"{d}_ratio": {"median": statistics.median(r), "min": min(r), "max": max(r)} for d, r in results.items()},
        **({"cpu": cpu} if args.cpu else {}),
    }
    print(f"plain river loop: {summary['plain_records_per_s']:,.0f} rec/s; calling the pipeline's steps directly, "
          f"as the worker's learner does: {summary['direct_records_per_s']:,.0f} rec/s "
          f"({summary['direct_records_per_s'] / summary['plain_records_per_s']:.2f}x)")
    for d, r in results.items():
        print(f"worker {d:<28} {summary[f'{d}_records_per_s']:,.0f} rec/s   ratio median {statistics.median(r):.3f} "
              f"(min {min(r):.3f}, max {max(r):.3f}, n={len(r)})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
