"""Cost growth with model size: throughput, resident memory and snapshot cost.

    python -m bench.model_size --height 9 --records 20000 --contender plain
    python -m bench.model_size --height 9 --records 20000 --contender file --data events.jsonl

One model at several sizes on the same Agrawal records: ``MinMaxScaler | HalfSpaceTrees``
(10 trees, anomaly detection) with trees of height ``--height``. Its state grows as
2^height (10 x 127 nodes at height 6, 10 x 8,191 at height 12), its work per record more
slowly (a walk down each tree, and a pass over every node once per window of 250 records),
so what grows with the state shows up: the snapshots (the worker pickles the model every
10,000 records, in its learner process) and the memory. Each
measurement runs in a child process of its own, so that its peak RSS is its own:

- ``plain``: ``score_one`` then ``learn_one`` over pre-decoded dicts; RSS without the records
  themselves. It also pickles the model it ends with: the size of that pickle and the
  time to write and to read it back (what a snapshot and a restore cost for this model);
- ``file``: the worker on the file transport over ``--data``
  (``bench.file_transport.worker_run``, snapshots every 10,000 records); RSS of its main
  process, of its learner process (where the model lives), and the size of its last
  snapshot on disk (the model with the monitors' state).
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

from bench.common import agrawal, plain_loop
from bench.harness import result
from bench.memory import built, peak_mb
from worker.config import ModelSettings
from worker.models import build_model

HEIGHTS = (6, 9, 12)
TASK = "anomaly"


def pipeline(height: int) -> list[dict]:
    return [{"preprocessing.MinMaxScaler": {}},
            {"anomaly.HalfSpaceTrees": {"n_trees": 10, "height": height, "window_size": 250, "seed": 42}}]


def _plain(height: int, records: int) -> dict:
    data, data_mb = built(lambda: agrawal(records))
    model = build_model(ModelSettings(task=TASK, pipeline=pipeline(height)))
    seconds = plain_loop(data, task=TASK, model=model)
    rss = peak_mb() - data_mb
    started = time.perf_counter()
    blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    dump_s = time.perf_counter() - started
    started = time.perf_counter()
    pickle.loads(blob)
    load_s = time.perf_counter() - started
    return {"seconds": seconds, "rss_mb": rss, "model_bytes": len(blob), "dump_ms": 1000 * dump_s,
            "load_ms": 1000 * load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--contender", choices=["plain", "file"], required=True)
    parser.add_argument("--data", type=Path, help="file: the JSON Lines records (bench.common.write_jsonl of agrawal)")
    args = parser.parse_args()
    if args.contender == "plain":
        out = _plain(args.height, args.records)
    else:
        from bench.file_transport import measured_run  # (not imported by the plain child: its RSS is its own)

        out = measured_run(args.data, model={"task": TASK, "pipeline": pipeline(args.height)})
    now = time.time()
    result(args.records, now - out.pop("seconds"), now, **out)


if __name__ == "__main__":
    main()
