"""Cost growth with record width: throughput and resident memory, 10 -> 1,000 features.

    python -m bench.width --features 100 --records 10000 --contender plain
    python -m bench.width --features 100 --records 10000 --contender file --data events.jsonl

Records are ``width`` Gaussian features and a label from a fixed linear rule (seeded), the
model StandardScaler | LogisticRegression, whose state grows with the width too. Each
measurement runs in a child process of its own so its peak RSS is its own:

- ``plain``: the plain loop over pre-decoded dicts. Its RSS is reported without the records
  themselves (peak RSS minus what building the list of records added);
- ``file``: the worker on the file transport over ``--data`` (written beforehand by the caller)
  (``bench.file_transport.worker_run``: decoding, validation, drift watch over at most 200
  features, metrics, snapshots every 10,000 records). Its RSS is the main process's peak;
  ``learner_peak_mb`` is the learner process's, where the model lives.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from bench.common import plain_loop, write_jsonl
from bench.harness import result
from bench.memory import built, peak_mb


def wide(n: int, width: int, seed: int = 7) -> list[tuple[dict, int]]:
    rng = random.Random(seed)
    weights = [rng.uniform(-1, 1) for _ in range(width)]
    out = []
    for _ in range(n):
        values = [rng.gauss(0, 1) for _ in range(width)]
        x = {f"f{i}": v for i, v in enumerate(values)}
        out.append((x, int(sum(w * v for w, v in zip(weights, values, strict=True)) > 0)))
    return out


def write_data(path: Path, n: int, width: int) -> Path:
    return write_jsonl(wide(n, width), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--contender", choices=["plain", "file"], required=True)
    parser.add_argument("--data", type=Path, help="file: the JSON Lines records (see write_data)")
    args = parser.parse_args()
    if args.contender == "plain":
        records, data_mb = built(lambda: wide(args.records, args.features))
        seconds = plain_loop(records)
        out = {"seconds": seconds, "rss_mb": peak_mb() - data_mb}
    else:
        from bench.file_transport import measured_run  # (not imported by the plain child: its RSS is its own)

        out = measured_run(args.data)
    now = time.time()
    result(args.records, now - out.pop("seconds"), now, **out)


if __name__ == "__main__":
    main()
