"""The opt-in mini-batch path (``model.mini_batch``) against the per-record limit, in one run.

    python -m bench.minibatch [--records 30000] [--repeat 3] [--sizes 500,1000,2000]

On the same Agrawal records (StandardScaler | LogisticRegression), alternately:

- the plain river loop (``predict_one`` then ``learn_one``): the per-record limit;
- the learner stage (:meth:`worker.learner.Learner.learn`, what the learner process runs)
  over poll batches of 2,000 orjson-decoded records, record by record and with groups of
  each size: the path's own speed;
- the whole worker on the file transport with ``limits.batch_size`` 2,000, record by record
  and with each group size: what a user gets, capped by the worker's other stages
  (decoding, validation, drift, quality, encoding), which stay per record;
- the difference the groups make: cumulative accuracy of the predictions, and the share of
  predicted labels that differ from the record-by-record predictions.

Ratios are against the plain loop of the same repetition; medians over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import orjson

from bench.common import REFERENCE_PIPELINE, agrawal, pin_hash_seed, plain_loop, summary, write_jsonl
from bench.file_transport import worker_run
from worker.config import load_settings
from worker.learner import Learner, LearnerConfig
from worker.state import ShardState

POLL = 2_000  #: records per poll batch (groups never cross one)


def learner_run(xs: list[dict], ys: list[int], mini_batch: int) -> tuple[float, list]:
    """(seconds, predicted labels) of the learner stage over ``xs`` in poll batches."""
    settings = load_settings(data={"model": {"pipeline": REFERENCE_PIPELINE, "mini_batch": mini_batch}}, env={})
    config = LearnerConfig(settings)
    learner = Learner(config, ShardState(shard="bench", model=config.new_model()))
    preds: list = []
    started = time.perf_counter()
    for i in range(0, len(xs), POLL):
        ids = list(range(i, min(i + POLL, len(xs))))
        preds += learner.learn(xs[i : i + POLL], ys[i : i + POLL], ids, ids, None).labels()
    return time.perf_counter() - started, preds


def measure(records: list[tuple[dict, int]], sizes: list[int], repeat: int, log=print) -> dict:
    xs = [orjson.loads(orjson.dumps(x)) for x, _ in records]  # as the learner process receives them
    ys = [y for _, y in records]
    workdir = Path(tempfile.mkdtemp(prefix="bench-minibatch-"))
    data = write_jsonl(records, workdir / "events.jsonl")
    modes = [0, *sizes]
    stage: dict[int, list[float]] = {m: [] for m in modes}
    worker: dict[int, list[float]] = {m: [] for m in modes}
    labels: dict[int, list] = {}
    try:
        for _ in range(repeat):
            for m in modes:
                p = plain_loop(records)
                seconds, labels[m] = learner_run(xs, ys, m)
                stage[m].append(p / seconds)
                p = plain_loop(records)
                worker[m].append(p / worker_run(data, workdir, checkpoints=False, model={"mini_batch": m},
                                                batch_size=POLL))
                log(f"  mini_batch {m or 'off'}: learner stage {stage[m][-1]:.2f}x, worker {worker[m][-1]:.2f}x "
                    "the per-record limit")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n = len(ys)
    rows = []
    for m in modes:
        accuracy = sum(p == y for p, y in zip(labels[m], ys)) / n
        differ = sum(p != q for p, q in zip(labels[m], labels[0])) / n
        rows.append({"mini_batch": m, "learner_ratios": stage[m], "worker_ratios": worker[m],
                     "learner": summary(stage[m]), "worker": summary(worker[m]),
                     "accuracy": accuracy, "labels_differ": differ})
    return {"records": n, "poll": POLL, "model": " | ".join(next(iter(s)) for s in REFERENCE_PIPELINE), "rows": rows}


def main() -> None:
    pin_hash_seed("bench.minibatch")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="500,1000,2000")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = measure(agrawal(args.records), [int(s) for s in args.sizes.split(",")], args.repeat)
    for r in result["rows"]:
        print(f"mini_batch {r['mini_batch'] or 'off':>5}: learner stage {r['learner']['median']:.2f}x, "
              f"worker {r['worker']['median']:.2f}x the per-record limit; accuracy {r['accuracy']:.4f}, "
              f"labels differing from record by record {r['labels_differ']:.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
