"""``worker demo``: the real streaming path on an embedded default, in under a minute.

Generates a river Agrawal stream whose concept changes part-way, runs the worker on it
(StandardScaler | LogisticRegression, ADWIN on the error) and prints, as they are
published, a sample of predictions, the rolling accuracy and the drift event.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import orjson
from river import datasets

from worker.records import Outputs, describe_event


def drifting_stream(n: int, change_at: int, seed: int = 42):
    """Agrawal with an abrupt concept change (classification function 0 -> 2) at ``change_at``."""
    stream = datasets.synth.ConceptDriftStream(
        stream=datasets.synth.Agrawal(classification_function=0, seed=seed),
        drift_stream=datasets.synth.Agrawal(classification_function=2, seed=seed + 1),
        position=change_at,
        width=100,
        seed=seed,
    )
    for i, (x, y) in enumerate(itertools.islice(stream, n)):
        yield {"id": i, "user": f"u{i % 100}", "x": x, "y": int(y)}


class PrintingSink:
    """Wraps a sink and shows what the worker publishes, in a few readable lines."""

    def __init__(self, inner, out: TextIO = sys.stdout, every: int = 2000):
        self.inner = inner
        self.out = out
        self.every = every
        self.seen = 0

    def publish(self, outputs: Outputs) -> None:
        self.inner.publish(outputs)
        for _, value in outputs.predictions:
            if self.seen % self.every == 0:
                p = orjson.loads(value)
                self.out.write(
                    f"prediction  id={p['id']:<6} key={p['key']:<4} -> {p['prediction']}  "
                    f"p={max(p['proba'].values()) if p.get('proba') else 0:.2f}\n"
                )
            self.seen += 1
        for _, value in outputs.metrics:
            m = orjson.loads(value)
            acc = m["rolling"].get("accuracy")
            if acc is not None:
                self.out.write(
                    f"metrics     position={m['position']:<6} rolling accuracy={acc:.3f} "
                    f"cumulative={m['cumulative']['accuracy']:.3f}\n"
                )
        for _, value in outputs.drift:
            self.out.write(describe_event(orjson.loads(value)) + "\n")
        self.out.flush()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def run_file_demo(records: int = 20000, change_at: int = 10000, port: int | None = 0) -> int:
    """Write the stream to a temporary JSON Lines file and run the worker over it."""
    from worker.config import load_settings
    from worker.learning import Engine
    from worker.monitoring.telemetry import Telemetry, TelemetryServer
    from worker.runtime import Runtime
    from worker.transports.file import FileSink, FileSource

    work = Path(tempfile.mkdtemp(prefix="worker-demo-"))
    data = work / "events.jsonl"
    with open(data, "wb") as f:
        for rec in drifting_stream(records, change_at):
            f.write(orjson.dumps(rec) + b"\n")
    settings = load_settings(
        data={
            "source": {"type": "file", "file": {"path": str(data)}},
            "outputs": {k: str(work / "out" / f"{k}.jsonl") for k in ("predictions", "drift", "metrics", "dead_letter")},
            "record": {"key": "user"},
            "monitor": {"every_records": 2000},
            "checkpoint": {"store": f"file://{work / 'state'}"},
            "telemetry": {"port": port},
        },
        env={},
    )
    telemetry = Telemetry()
    server = TelemetryServer(telemetry, "127.0.0.1", port).start() if port is not None else None
    print(f"demo: {records} Agrawal records, concept change at {change_at}; outputs in {work / 'out'}")
    if server is not None:
        print(f"demo: Prometheus metrics on http://127.0.0.1:{server.port}/metrics")
    try:
        sink = PrintingSink(FileSink(settings.outputs.model_dump()))
        from worker.checkpoint import FileStore

        runtime = Runtime(Engine(settings, telemetry), FileSource(str(data)), sink, FileStore(work / "state"))
        runtime.install_signal_handlers()
        rc = runtime.run()
    finally:
        if server is not None:
            server.close()
    print(f"demo: done, {runtime.records} records; snapshot in {work / 'state'}")
    return rc


def run_kafka_demo(
    records: int = 20000,
    change_at: int = 10000,
    port: int | None = 0,
    rate: float = 4000.0,
    bootstrap: str | None = None,
    timeout: float = 180.0,
) -> int:
    """The real streaming path: tansu (or ``bootstrap``), a feeder, the worker (exactly_once).

    Prints, as they arrive on the output topics (read_committed), a sample of predictions,
    the rolling accuracy and the drift event; stops by itself once every record has its
    prediction (or after ``timeout`` seconds).
    """
    import contextlib
    import threading
    import time

    from worker.config import load_settings
    from worker.embedded import CONSUMER_OVERRIDES, EmbeddedBroker
    from worker.feeder import feed
    from worker.learning import Engine
    from worker.monitoring.telemetry import Telemetry, TelemetryServer
    from worker.runtime import Runtime
    from worker.transports.kafka import OutputReader, create_topics, open_kafka

    work = Path(tempfile.mkdtemp(prefix="worker-demo-"))
    with contextlib.ExitStack() as stack:
        if bootstrap is None:
            print("demo: starting the embedded Kafka-API broker (tansu) ...")
            bootstrap = stack.enter_context(EmbeddedBroker(work / "tansu")).bootstrap
            assert bootstrap is not None
        topics = {"predictions": "predictions", "drift": "drift", "metrics": "metrics", "dead_letter": "dead-letters"}
        create_topics(bootstrap, ["events"], partitions=2)
        create_topics(bootstrap, topics.values(), partitions=1)
        settings = load_settings(
            data={
                "source": {"type": "kafka", "kafka": {
                    "bootstrap_servers": bootstrap, "topics": ["events"], "group_id": "worker-demo",
                    "consumer": dict(CONSUMER_OVERRIDES), "transactional_id": "worker-demo-0",
                }},
                "outputs": topics,
                "record": {"key": "user"},
                "monitor": {"every_records": 2000},
                "checkpoint": {"store": f"file://{work / 'state'}"},
                "limits": {"batch_size": 1000},
                "delivery": "exactly_once",
                "telemetry": {"port": port},
            },
            env={},
        )
        telemetry = Telemetry()
        if port is not None:
            server = stack.enter_context(contextlib.closing(TelemetryServer(telemetry, "127.0.0.1", port).start()))
            print(f"demo: Prometheus metrics on http://127.0.0.1:{server.port}/metrics")
        print(f"demo: broker {bootstrap}; feeding {records} Agrawal records at {rate:.0f}/s into 'events' "
              f"(2 partitions), concept change at {change_at}")
        stop_feed = threading.Event()
        feeder = threading.Thread(
            target=feed, args=(bootstrap, "events", drifting_stream(records, change_at)),
            kwargs={"rate": rate, "stop": stop_feed}, daemon=True,
        )
        feeder.start()
        source, sink = open_kafka(settings, telemetry)
        runtime = Runtime(Engine(settings, telemetry), source, sink, _store(settings))
        runtime.install_signal_handlers()
        printer = PrintingSink(_Null())
        reader = OutputReader(bootstrap, list(topics.values()))
        seen = 0

        def watch() -> None:
            nonlocal seen
            deadline = time.monotonic() + timeout
            while not runtime._stop.is_set():
                outputs = reader.poll(0.2, topics)
                seen += len(outputs.predictions)
                printer.publish(outputs)
                if seen >= records or time.monotonic() > deadline:
                    runtime.stop()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        rc = runtime.run()
        stop_feed.set()
        watcher.join(timeout=5)
        reader.close()
        feeder.join(timeout=5)
        print(f"demo: done: {seen} predictions read back (read_committed) in {time.monotonic() - started:.1f}s")
    return rc


def _store(settings):
    from worker.checkpoint import open_store

    return open_store(settings.checkpoint.store, settings)


class _Null:
    def publish(self, outputs: Outputs) -> None:
        return None
