"""Plumbing shared by the broker benchmarks: brokers, topics, child processes, timing.

Every contender runs in a child process of its own (so no librdkafka thread or heap of one
run lingers into the next) and prints one JSON line on stdout at the end::

    {"records": 30000, "seconds": 1.92}

``seconds`` always spans the same thing: from the moment the first input record reached
the contender (after it joined the group and was assigned its partitions) to the moment its
last outputs and offsets were committed. Input topics are filled before the contender starts.
Children run in their own session, are bounded in time and, on overrun, killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
#: Where Quix Streams is installed: its own virtualenv, because it pins confluent-kafka < 2.13
#: and the worker's environment must keep its own client version.
QUIX_VENV = Path(os.environ.get("BENCH_QUIX_VENV", Path.home() / ".cache" / "worker-bench" / "quix-venv"))


#: tansu 0.6 answers a fetch only when ``fetch.wait.max.ms`` has passed, even when records are
#: there (one record, produced then consumed: 200 ms median at librdkafka's 500 ms default,
#: 2 ms at 10 ms). Every consumer on tansu (every contender alike) gets this, or latencies
#: would measure tansu's wait instead of the consumers.
TANSU_FETCH = {"fetch.wait.max.ms": 10}


class ChildFailed(RuntimeError):
    """A contender exited without its result line (or ran over its time bound)."""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def encode(records: Sequence[tuple[dict, int]]) -> list[bytes]:
    """The records as every contender reads them: ``{"id", "x", "y"}`` JSON."""
    return [orjson.dumps({"id": i, "x": x, "y": y}) for i, (x, y) in enumerate(records)]


def json_arg(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- brokers -----------------------------------------------------------------------------------
def off_learner_cpus(name: str) -> frozenset[int] | None:
    """Where the broker ``name`` runs while the throughput contenders take their turns: off the
    CPU that the worker's learner process gets (:data:`bench.common.WORKER_AFFINITY`), or
    None (wherever the system puts it).

    A worker pinned with ``cpu_affinity: split`` is the bottleneck on its learner's CPU, and
    a host configured for it keeps other processes off that CPU (docs/operations.md). tansu
    (~0.12 of a core) is kept off it: left anywhere, its threads took ~8 % of the learner's
    CPU away, and the worker's ratio rose from 0.89-0.92 to 0.98-0.99 when it was kept off
    (A/B on two tansu brokers, ``python -m bench.kafka --bootstrap``, 100,000 records).
    Apache Kafka (~0.4 of a core) is left anywhere: on the worker's other CPU it left too
    little for the worker's own process (exactly-once 0.66 against 0.77, at-least-once 0.71
    against 0.79). The single-process contenders run where the system puts them, beside a
    broker kept off one CPU just the same.
    """
    from bench.common import WORKER_AFFINITY
    from worker import affinity

    split = affinity.plan(WORKER_AFFINITY)
    return split.worker if name == "tansu" and split is not None else None


def start_broker(name: str, cpus: frozenset[int] | None = None) -> Any:
    """Start ``tansu`` or ``kafka`` (Apache Kafka 4.x, KRaft) on 127.0.0.1 (a ``tests.brokers``
    launcher; stop it with :func:`stop_broker`). ``cpus``: the CPUs it runs on (default:
    wherever the system puts it; see :func:`off_learner_cpus`)."""
    sys.path.insert(0, str(REPO))
    from tests.brokers import ApacheKafka, Tansu

    # Apache Kafka with the heap of its own start script (1 GiB, -Xms = -Xmx): with the tests'
    # growing 512 MiB heap, its young collections (7-27 ms each) came 2-3 times a second and
    # were most of the at-least-once latency tail (docs/kafka.md, latency).
    b = Tansu() if name == "tansu" else ApacheKafka(heap="1g", fixed_heap=True)
    b.cpus = None if cpus is None else set(cpus)
    b.start()
    return b


def stop_broker(b: Any) -> None:
    from tests.brokers import ApacheKafka

    if isinstance(b, ApacheKafka):
        b.stop()
        b.cleanup()
    else:
        b.kill()  # tansu: in-memory storage, nothing to flush, and SIGTERM takes it ~5 s


@contextlib.contextmanager
def broker(name: str, cpus: frozenset[int] | None = None) -> Iterator[tuple[str, dict]]:
    """:func:`start_broker`, then yield (bootstrap, consumer overrides); stopped on exit.

    On tansu the overrides are TANSU_CONSUMER_OVERRIDES (group joins) and TANSU_FETCH.
    """
    b = start_broker(name, cpus)
    try:
        from tests.brokers import TANSU_CONSUMER_OVERRIDES

        yield b.bootstrap, {**TANSU_CONSUMER_OVERRIDES, **TANSU_FETCH} if name == "tansu" else {}
    finally:
        stop_broker(b)


def fill(bootstrap: str, topic: str, values: Sequence[bytes], partitions: int = 1) -> None:
    """Create ``topic`` and write ``values`` to it (round-robin over partitions), acknowledged."""
    from worker.transports.kafka import RecordProducer, create_topics

    create_topics(bootstrap, [topic], partitions=partitions)
    producer = RecordProducer(bootstrap, **{"linger.ms": 5, "batch.num.messages": 10000})
    for i, value in enumerate(values):
        producer.send(topic, value, partition=i % partitions)
    producer.flush()


def outputs(tag: str) -> dict[str, str]:
    """Output topic names of one run (created by the contender's producer on first use)."""
    return {"predictions": f"{tag}-predictions", "drift": f"{tag}-drift", "metrics": f"{tag}-metrics",
            "dead_letter": f"{tag}-dead"}


# -- child processes -----------------------------------------------------------------------------
def python_cmd(module: str, *args: str, venv: Path | None = None) -> list[str]:
    exe = str(venv / "bin" / "python") if venv is not None else sys.executable
    return [exe, "-m", module, *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def start(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start a child in its own session (stdout piped, stderr to ``log`` or discarded)."""
    err = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child keeps its own copy
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True)
    finally:
        if log is not None:
            err.close()


def finish(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for the child's result line; on overrun SIGKILL it (by pid) and raise."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise ChildFailed(f"{' '.join(proc.args[:3])} ran over {timeout:.0f}s") from None
    except BaseException:  # interrupted (Ctrl-C, SIGTERM: see interruptible): the child goes too
        stop(proc)
        raise
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise ChildFailed(f"{' '.join(proc.args[:3])} exited {proc.returncode} without a result")
    return json.loads(lines[-1])


def run(cmd: list[str], timeout: float, log: Path | None = None) -> dict:
    return finish(start(cmd, log), timeout)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child (by pid), then SIGKILL it if it is still there after ``grace``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(grace)


#: The keys of every child's result line (see :func:`result`); anything else is the child's own.
RESULT_KEYS = frozenset({"records", "seconds", "first", "end"})


def result(records: int, first: float | None, end: float | None, **extra: object) -> None:
    """Print a child's result line (wall-clock ``first`` and ``end``, so processes can be compared)."""
    seconds = (end - first) if first is not None and end is not None else None
    print(json.dumps({"records": records, "seconds": seconds, "first": first, "end": end, **extra}), flush=True)


def interruptible() -> None:
    """SIGTERM unwinds the suite as Ctrl-C does (KeyboardInterrupt), so that every ``finally``
    runs: the children (in their own sessions, out of reach of the terminal's signals) and the
    brokers are stopped by pid instead of being left running."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


class Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.at
