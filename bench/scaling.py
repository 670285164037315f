"""Scaling out: 1 vs 2 worker processes in one consumer group on a 4-partition topic.

The processes (``bench.worker_kafka``, exactly-once, one transactional id each, a shared
file checkpoint store) join the group on an empty topic; once the group has settled (every
partition owned, each process owning its share) the records are written, round-robin over
the 4 partitions, and each process stops after ``idle_stop`` seconds without records. Throughput is
``records / (last commit of any process - first record of any process)``.

Each configuration is measured with the learner in a child process (``learner: process``,
the default: one worker is then two OS processes and already uses both cores) and inline
(``learner: inline``: one OS process per worker, which is what the scale-out goal is about).

This machine has 2 cores, shared by the broker and the workers: the ratio says how much of
the second core the second worker gets, not how the worker scales on a larger machine.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench import harness as h

PARTITIONS = 4
#: Where each worker's model learns: in a child process (the default: one worker already uses
#: both cores) and inline (one OS process per worker: what the scale-out itself gives).
LEARNERS = ("process", "inline")


def _settled(status: list[Path], processes: int) -> bool:
    try:
        owned = [int(p.read_text() or 0) for p in status]
    except (FileNotFoundError, ValueError):
        return False
    return sum(owned) == PARTITIONS and all(o == PARTITIONS // processes for o in owned)


def measure(bootstrap: str, consumer_conf: dict, values: list[bytes], processes: int, idle_stop: float = 2.0,
            timeout: float = 180.0, learner: str = "process") -> dict:
    from worker.transports.kafka import create_topics

    tag = h.unique(f"scale{processes}")
    topic = f"{tag}-in"
    create_topics(bootstrap, [topic], partitions=PARTITIONS)
    create_topics(bootstrap, h.outputs(tag).values(), partitions=PARTITIONS)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    status = [workdir / f"status-{i}" for i in range(processes)]
    procs = []
    try:
        for i in range(processes):
            cmd = h.python_cmd(
                "bench.worker_kafka", "--bootstrap", bootstrap, "--topic", topic, "--tag", tag,
                "--group", f"{tag}-group", "--transactional-id", f"{tag}-txn-{i}", "--store", str(workdir / "state"),
                "--idle-stop", str(idle_stop), "--status", str(status[i]), "--consumer-config", h.json_arg(consumer_conf),
                "--learner", learner,
            )
            procs.append(h.start(cmd, workdir / f"worker-{i}.log"))
        deadline = h.Deadline(60)
        while not _settled(status, processes):
            if deadline.passed():
                raise h.ChildFailed(f"the group of {processes} did not settle in 60 s (logs in {workdir})")
            time.sleep(0.2)
        h.fill(bootstrap, topic, values, partitions=PARTITIONS)
        results = [h.finish(p, timeout) for p in procs]
    finally:
        for p in procs:
            h.stop(p)
    shutil.rmtree(workdir, ignore_errors=True)  # (kept when the run failed: the logs are there)
    records = sum(r["records"] for r in results)
    seconds = max(r["end"] for r in results) - min(r["first"] for r in results if r["first"] is not None)
    return {"processes": processes, "learner": learner, "records": records, "seconds": seconds, "rate": records / seconds,
            "per_process": [r["records"] for r in results]}
