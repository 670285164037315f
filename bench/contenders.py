"""The Kafka contenders, each against the plain river loop measured right before and right after it.

For each broker, one input topic (1 partition) is filled once with the records; every
repetition of every contender reads it from the start with a fresh consumer group and
writes to fresh output topics. A repetition is: the plain loop over the same pre-decoded
records (in this process), the contender (in a child process), the plain loop again; its
ratio is ``plain seconds / contender seconds`` with the mean of the two plain loops (the
one after a contender is the one before the next). The plain loop's own speed drifts by up
to 2x within a run on a shared machine (38k-73k records/s in one suite run): the bracket
follows the machine's speed during the contender's run better than one measurement before
it. Contenders are interleaved repetition by repetition, so slow phases of a shared machine
hit all of them alike.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import harness as h
from bench.common import WORKER_AFFINITY, plain_loop

#: name -> what the table calls it.
CONTENDERS = {
    "hand_alo": "hand-written confluent-kafka loop, at-least-once",
    "hand_txn": "hand-written confluent-kafka loop, transactional",
    "quix_alo": "Quix Streams, at-least-once",
    "quix_eos": "Quix Streams, exactly-once",
    "worker_alo": "this worker, Kafka at-least-once",
    "worker_eos": "this worker, Kafka exactly-once",
}


def command(name: str, bootstrap: str, topic: str, records: int, consumer_conf: dict, workdir: Path) -> list[str]:
    """The child command of one repetition (creates its output topics first)."""
    from worker.transports.kafka import create_topics

    tag = h.unique(name.replace("_", "-"))
    common = ["--bootstrap", bootstrap, "--topic", topic, "--records", str(records),
              "--consumer-config", h.json_arg(consumer_conf)]
    if name.startswith("worker"):
        create_topics(bootstrap, h.outputs(tag).values())
        delivery = "at_least_once" if name == "worker_alo" else "exactly_once"
        return h.python_cmd("bench.worker_kafka", *common, "--tag", tag, "--delivery", delivery,
                            "--store", str(workdir / tag), "--cpu-affinity", WORKER_AFFINITY)
    out = f"{tag}-out"
    create_topics(bootstrap, [out])
    if name.startswith("hand"):
        return h.python_cmd("bench.handwritten", *common, "--out", out, *(["--transactional"] if name == "hand_txn" else []))
    guarantee = "exactly-once" if name == "quix_eos" else "at-least-once"
    return h.python_cmd("bench.quix_app", *common, "--out", out, "--guarantee", guarantee, venv=h.QUIX_VENV)


def available(name: str) -> str | None:
    """Why a contender cannot run here (None if it can)."""
    if name.startswith("quix") and not (h.QUIX_VENV / "bin" / "python").exists():
        return f"Quix Streams not installed in {h.QUIX_VENV} (see bench/README.md)"
    return None


def measure(broker: str, bootstrap: str, consumer_conf: dict, records: list, values: list[bytes], names: list[str],
            repeat: int, log: Callable[[str], None], timeout: float = 180.0) -> list[dict]:
    """Rows ``{contender, broker, rates, ratios, plain_rates}`` for each contender on a running broker."""
    n = len(records)
    rows = {name: {"contender": name, "label": CONTENDERS[name], "broker": broker, "records": n, "rates": [],
                   "ratios": [], "plain_rates": [], "errors": []} for name in names}
    for name in names:
        if (why := available(name)) is not None:
            rows[name]["errors"].append(why)
    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    topic = h.unique("bench-in")
    h.fill(bootstrap, topic, values)
    before = None  # seconds of the last plain loop, if it ran right before this contender
    for rep in range(repeat):
        for name in names:
            row = rows[name]
            if row["errors"] and not row["rates"]:
                continue
            if before is None:
                before = plain_loop(records)
            try:
                res = h.run(command(name, bootstrap, topic, n, consumer_conf, workdir), timeout, workdir / f"{name}.log")
            except h.ChildFailed as exc:
                row["errors"].append(str(exc))
                log(f"  {broker} {name} #{rep + 1}: FAILED ({exc}; log {workdir / f'{name}.log'})")
                before = None
                continue
            after = plain_loop(records)
            plain, before = (before + after) / 2, after
            rate = res["records"] / res["seconds"]
            row["rates"].append(rate)
            row["plain_rates"].append(n / plain)
            row["ratios"].append(rate / (n / plain))
            log(f"  {broker} {name} #{rep + 1}: {rate:,.0f} rec/s = {row['ratios'][-1]:.2f} of the plain loop")
    if not any(row["errors"] for row in rows.values()):  # (else kept: the failures' logs are there)
        shutil.rmtree(workdir, ignore_errors=True)
    return list(rows.values())
