"""The worker on the file transport as a ratio of the plain river loop over the same records.

    python -m bench.file_transport [--records 50000] [--repeat 5]

Both run in this process, alternately, on the same records: the plain loop over pre-decoded
dicts (``predict_one`` then ``learn_one``), and the worker reading JSON Lines, validating,
predicting with probabilities, learning, scoring, watching drift and writing predictions,
metrics and dead letters to files, with checkpoints every 10,000 records, its learner
process on a CPU of its own (``cpu_affinity: split``, :data:`bench.common.WORKER_AFFINITY`).
The worker's time runs from the moment its learner process is up to the end of its final
checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import REFERENCE_PIPELINE, WORKER_AFFINITY, agrawal, pin_hash_seed, plain_loop, summary, write_jsonl
from bench.memory import PeakSampler, peak_mb
from worker.checkpoint import FileStore
from worker.config import load_settings
from worker.learning import Engine
from worker.runtime import Runtime
from worker.transports.file import FileSink, FileSource


def worker_run(data: Path, workdir: Path, checkpoints: bool = True, model: dict | None = None,
               batch_size: int | None = None, memory: dict | None = None) -> float:
    """Seconds the worker takes over ``data``; ``model``: settings over the reference model's
    (e.g. ``{"mini_batch": 1000}``), ``batch_size``: ``limits.batch_size``. With ``memory`` (a
    dict), its ``learner_peak_mb`` becomes the learner process's peak resident set."""
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(workdir / "state", ignore_errors=True)
    settings = load_settings(
        data={
            "source": {"type": "file", "file": {"path": str(data)}},
            "outputs": {k: str(out / f"{k}.jsonl") for k in ("predictions", "drift", "metrics", "dead_letter")},
            "model": {"task": "classification", "pipeline": REFERENCE_PIPELINE, **(model or {})},
            "checkpoint": {"store": f"file://{workdir / 'state'}" if checkpoints else None, "every_records": 10000},
            **({"limits": {"batch_size": batch_size}} if batch_size else {}),
            "telemetry": {"port": None},
            "cpu_affinity": WORKER_AFFINITY,
        },
        env={},
    )
    engine = Engine(settings)
    outputs = settings.outputs.model_dump()
    runtime = Runtime(
        engine,
        FileSource(str(data)),
        FileSink(outputs),
        FileStore(workdir / "state") if checkpoints else None,
    )
    runtime.learners.ready()  # the learner process's start-up (about 0.4 s) is not throughput
    pid = runtime.learners.pid  # (None: the learners run inline)
    with PeakSampler(lambda: pid) if memory is not None else contextlib.nullcontext() as sampler:
        started = time.perf_counter()
        runtime.run()
        seconds = time.perf_counter() - started
    if memory is not None:
        memory["learner_peak_mb"] = sampler.peak_mb
    return seconds


def measured_run(data: Path, model: dict | None = None) -> dict:
    """:func:`worker_run` in a temporary directory of its own (removed after), as a child of
    the growth benchmarks runs it: ``seconds``, this process's peak RSS (``rss_mb``), the
    learner process's (``learner_peak_mb``) and the size of the last snapshot written
    (``snapshot_bytes``)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-file-"))
    memory: dict = {}
    try:
        seconds = worker_run(data, workdir, model=model, memory=memory)
        snapshots = [p.stat().st_size for p in (workdir / "state").rglob("*") if p.is_file()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"seconds": seconds, "rss_mb": peak_mb(), "snapshot_bytes": max(snapshots, default=None), **memory}


def main() -> None:
    pin_hash_seed("bench.file_transport")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    records = agrawal(args.records)
    workdir = Path(tempfile.mkdtemp(prefix="bench-file-"))
    data = write_jsonl(records, workdir / "events.jsonl")
    ratios, plain_times, worker_times = [], [], []
    for _ in range(args.repeat):
        p = plain_loop(records)
        w = worker_run(data, workdir)
        plain_times.append(p)
        worker_times.append(w)
        ratios.append(p / w)
    shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "file_transport",
        "records": args.records,
        "plain_records_per_s": args.records / min(plain_times),
        "worker_records_per_s": args.records / min(worker_times),
        "ratio": summary(ratios),
    }
    print(
        f"plain river loop: {result['plain_records_per_s']:,.0f} rec/s   "
        f"worker (file): {result['worker_records_per_s']:,.0f} rec/s   "
        f"ratio median {result['ratio']['median']:.3f} (min {result['ratio']['min']:.3f}, max {result['ratio']['max']:.3f}, n={args.repeat})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
