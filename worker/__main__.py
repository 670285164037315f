"""Command line: ``worker run | evaluate | train | check | demo | produce`` (also ``python -m worker``).

Exit codes: 0 success, 1 runtime failure, 2 configuration error (the message names the key).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from worker.errors import ConfigError, WorkerError

if TYPE_CHECKING:
    from worker.config import Settings

#: Set by SIGTERM/SIGINT during ``worker run`` (installed before the heavy imports).
STOP = threading.Event()

log = logging.getLogger("worker")


def _settings(args: argparse.Namespace) -> Settings:
    from worker.config import load_settings

    return load_settings(args.config)


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from worker.config import dump_settings

    sys.stdout.write(dump_settings(settings))
    sys.stdout.write("# configuration OK\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from worker.learner import open_learners

    settings = _settings(args)
    learners = open_learners(settings)  # the learner process starts first: its imports overlap with ours

    from worker.checkpoint import open_store
    from worker.learning import Engine
    from worker.logs import setup_logging
    from worker.monitoring.telemetry import Telemetry, TelemetryServer
    from worker.runtime import Runtime
    from worker.transports import open_transport

    setup_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    telemetry = Telemetry()
    server = None
    try:
        if settings.telemetry.port is not None:
            try:
                server = TelemetryServer(telemetry, settings.telemetry.host, settings.telemetry.port).start()
            except OSError as exc:  # in use, or a host that is not this machine's
                raise ConfigError("telemetry.port", f"cannot listen on {settings.telemetry.host}:"
                                  f"{settings.telemetry.port}: {exc} (telemetry.host / telemetry.port)") from exc
            log.info("telemetry listening", extra={"port": server.port})
        engine = Engine(settings, telemetry)
        store = open_store(settings.checkpoint.store, settings) if settings.checkpoint.store else None
        key = settings.checkpoint.hmac_key.get_secret_value().encode() if settings.checkpoint.hmac_key else None
        source, sink = open_transport(settings, telemetry)
        runtime = Runtime(engine, source, sink, store, key, stop_event=STOP, learners=learners)
        runtime.install_signal_handlers()
        return runtime.run()
    finally:
        learners.close()
        if server is not None:
            server.close()


def _offline(settings: Settings, data: str, publish: bool):
    """Run the configured pipeline over a file with no sink; returns (shard, outputs)."""
    from worker.learning import Engine
    from worker.records import Outputs
    from worker.transports.file import FileSource

    engine = Engine(settings)
    source = FileSource(data)
    source.start(None)
    shard = engine.shard(source.shard)
    collected = Outputs()
    publish_from = 0 if publish else math.inf
    while batches := source.poll(settings.limits.batch_size, 0.0):
        for b in batches:
            out = shard.process(b.values, b.positions, publish_from=publish_from)
            collected.drift.extend(out.drift)
            collected.dead_letters.extend(out.dead_letters)
    source.close()
    return engine, shard, collected


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine, shard, out = _offline(settings, args.data, publish=True)
    report = orjson.loads(shard.report())
    tel = engine.telemetry
    summary = {
        "records": report["records"],
        "learned": tel.registry.get_sample_value("worker_records_total", {"outcome": "learned"}),
        "dead_letters": len(out.dead_letters),
        "cumulative": report["cumulative"],
        "rolling": report["rolling"],
        "drift_events": [orjson.loads(v) for _, v in out.drift],
    }
    if args.format == "json":
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    w = settings.monitor.window
    print(f"model: {' | '.join(next(iter(s)) for s in settings.model.pipeline)}  task: {settings.model.task}")
    print(f"records: {summary['records']}  learned: {int(summary['learned'] or 0)}  dead letters: {summary['dead_letters']}")
    print()
    print(f"| {'metric':<10} | {'cumulative':>12} | {f'last {w}':>12} |")
    print(f"|{'-' * 12}|{'-' * 14}|{'-' * 14}|")
    for name, value in report["cumulative"].items():
        if name == "n":
            continue
        rolling = report["rolling"].get(name)
        print(f"| {name:<10} | {_cell(value)} | {_cell(rolling)} |")
    print()
    events = summary["drift_events"]
    print(f"drift-output events: {len(events)}")
    from worker.records import describe_event

    for e in events:
        print("  " + describe_event(e))
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:12.4f}"
    return f"{'' if value is None else value!s:>12}"


def cmd_train(args: argparse.Namespace) -> int:
    from worker.checkpoint import WARM_START, open_store
    from worker.state import dumps_snapshot

    settings = _settings(args)
    if not settings.checkpoint.store:
        raise ConfigError("checkpoint.store", "worker train writes a snapshot: set a checkpoint store")
    engine, shard, _ = _offline(settings, args.data, publish=False)
    state = shard.state
    name = args.shard or WARM_START
    state.shard, state.extra = name, {}
    state.position = 0
    key = settings.checkpoint.hmac_key.get_secret_value().encode() if settings.checkpoint.hmac_key else None
    store = open_store(settings.checkpoint.store, settings)
    store.save(name, dumps_snapshot(state, engine.spec, key))
    store.close()
    print(f"trained on {state.records_seen} records; snapshot {name!r} written to {settings.checkpoint.store}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_file_demo, run_kafka_demo

    if args.transport == "file":
        return run_file_demo(records=args.records, change_at=args.change_at, port=args.port)
    return run_kafka_demo(records=args.records, change_at=args.change_at, port=args.port, rate=args.rate,
                          bootstrap=args.bootstrap, timeout=args.timeout)


def cmd_produce(args: argparse.Namespace) -> int:
    from worker.feeder import feed, synthetic

    if (args.bootstrap is None) == (args.rabbitmq is None):
        raise ConfigError("produce", "give one of --bootstrap (Kafka) or --rabbitmq (an AMQP URL)")
    records = synthetic(args.records, seed=args.seed, drift_at=args.drift_at, keys=args.keys)
    if args.rabbitmq is not None:
        from worker.transports.rabbitmq import RecordPublisher, declare_topology, shard_queues

        if args.partitions:
            declare_topology(args.rabbitmq, args.topic, shard_queues(args.topic, args.partitions), [])
        sent = feed("", args.topic, records, rate=args.rate, producer=RecordPublisher(args.rabbitmq))
        print(f"published {sent} records to exchange {args.topic}", file=sys.stderr)
        return 0
    from worker.transports.kafka import create_topics

    if args.partitions:
        create_topics(args.bootstrap, [args.topic], partitions=args.partitions)
    sent = feed(args.bootstrap, args.topic, records, rate=args.rate)
    print(f"produced {sent} records to {args.topic}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description="Streaming online-learning worker (river).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the worker on the configured source")
    p.add_argument("--config", "-c", required=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="validate a configuration and print the resolved settings")
    p.add_argument("--config", "-c", required=True)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("evaluate", help="progressive validation of the configured model over a file")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--data", "-d", required=True, help="JSON Lines file ('-' for stdin)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("train", help="learn from historical records and write a warm-start snapshot")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--data", "-d", required=True)
    p.add_argument("--shard", help="write the snapshot for this shard instead of the warm-start one")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="run the worker on a generated drifting stream (embedded default)")
    p.add_argument("--records", type=_positive, default=20000)
    p.add_argument("--change-at", type=_count, default=10000)
    p.add_argument("--port", type=int, default=0, help="Prometheus port (0 = any free port)")
    p.add_argument("--transport", choices=["kafka", "file"], default="kafka",
                   help="kafka: an embedded broker (tansu), a feeder and the worker (default); file: no broker")
    p.add_argument("--rate", type=_rate, default=4000.0, help="kafka: records per second fed")
    p.add_argument("--bootstrap", help="kafka: use this broker instead of starting tansu")
    p.add_argument("--timeout", type=float, default=180.0, help="kafka: stop after this many seconds at most")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("produce", help="feed a river synthetic stream (Agrawal with a concept change) to a topic "
                       "or a RabbitMQ exchange")
    p.add_argument("--bootstrap", "-b", help="Kafka bootstrap servers")
    p.add_argument("--rabbitmq", help="an AMQP URL: publish to the exchange --topic (routing key = record key)")
    p.add_argument("--topic", "-t", required=True, help="Kafka topic, or RabbitMQ exchange with --rabbitmq")
    p.add_argument("--records", "-n", type=_positive, default=20000)
    p.add_argument("--rate", type=_rate, default=None, help="records per second (default: as fast as possible)")
    p.add_argument("--partitions", type=_count, default=0, help="create the topic with this many partitions if "
                   "missing (--rabbitmq: declare the exchange with this many shard queues)")
    p.add_argument("--keys", type=_count, default=100, help="distinct record keys (k0, k1, ...); 0 = no key")
    p.add_argument("--drift-at", type=_count, default=None, help="concept change position (default: half-way)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_produce)
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # SIGTERM/SIGINT are honoured from here on, even while river is still importing: a stop
        # requested during start-up ends the run cleanly as soon as it begins (exit 0).
        signal.signal(signal.SIGTERM, lambda *_: STOP.set())
        signal.signal(signal.SIGINT, lambda *_: STOP.set())
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
