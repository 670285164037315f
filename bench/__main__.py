"""The benchmark suite: every benchmark on the same records and machine, in one run.

    python -m bench [--quick] [--records N] [--repeat R] [--only SECTION ...] [--brokers tansu,kafka]

Sections (``--only`` takes any of them, comma-separated or repeated):

- ``limit``: the plain river loop (``predict_one`` then ``learn_one``) over pre-decoded
  Agrawal records, for each model family: the ceiling no worker can beat;
- ``file``: this worker on the file transport, alternated with the plain loop;
- ``minibatch``: ``model.mini_batch`` (groups of 500, 1,000, 2,000) against the per-record
  limit: the learner stage and the whole file worker, and the predictions it changes;
- ``kafka``: on each broker, hand-written confluent-kafka loops (at-least-once,
  transactional), Quix Streams (at-least-once, exactly-once) and this worker (at-least-once,
  exactly-once), each against the plain loop measured right before and after it (``bench.contenders``);
- ``latency``: record-to-prediction p50/p99 at half the worker's maximum rate, measured with
  the load generator and the reader on the same cores (and at 1,000 records/s: the floor);
- ``scaling``: 1 vs 2 workers on a 4-partition topic, with the learner in its own process
  (the default) and inline (first broker only);
- ``width``: throughput and RSS against record width, 10 -> 1,000 features;
- ``model_size``: throughput, RSS and snapshot cost against model size (HalfSpaceTrees of
  height 6, 9, 12: 10 x 127 to 10 x 8,191 nodes);
- ``rabbitmq``: on a RabbitMQ node, a plain asynchronous pika loop (publisher confirms,
  acks after them) and this worker (1 shard queue, at-least-once, acks after snapshots),
  each against the plain loop measured right before and after it, and the worker / pika
  loop ratio (``bench.rabbitmq``). Without RabbitMQ installed its rows say "not measured"
  (under ``CI=true`` that is an error).

Writes ``bench/results/results.md``, ``results.json`` and ``throughput.png`` (``--out``).
Headline figures are ratios measured in the same run: the median of ``--repeat``
repetitions with their min and max.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import contenders, harness, latency, minibatch, scaling
from bench import model_size as model_size_bench
from bench import rabbitmq as rabbitmq_bench
from bench.common import FAMILIES, REFERENCE_PIPELINE, agrawal, pin_hash_seed, plain_loop, summary, write_jsonl
from bench.file_transport import worker_run
from bench.report import write_all
from bench.width import write_data

SECTIONS = ("limit", "file", "minibatch", "kafka", "latency", "scaling", "width", "model_size", "rabbitmq")
#: KNN and ARF run ~1,000 records/s: they get fewer records than the others (rates are per record).
SLOW_FAMILIES = {"KNNClassifier", "ARFClassifier"}
#: The latency floor is taken at this rate (records/s), besides half the worker's maximum.
LOW_RATE = 1_000.0


_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:5.0f}s] {message}", file=sys.stderr, flush=True)


def limit(records: list, repeat: int, slow_records: int) -> list[dict]:
    rows = []
    for family, pipeline in FAMILIES.items():
        data = records[:slow_records] if family in SLOW_FAMILIES else records
        rates = [len(data) / plain_loop(data, pipeline) for _ in range(repeat)]
        rows.append({"family": family, "records": len(data), "rates": rates, "rate": summary(rates)})
        log(f"  {family}: {statistics.median(rates):,.0f} rec/s over {len(data):,} records")
    return rows


def file_worker(records: list, repeat: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-file-"))
    data = write_jsonl(records, workdir / "events.jsonl")
    rates, plain_rates, ratios = [], [], []
    for _ in range(repeat):
        p = plain_loop(records)
        w = worker_run(data, workdir)
        rates.append(len(records) / w)
        plain_rates.append(len(records) / p)
        ratios.append(p / w)
        log(f"  file worker: {rates[-1]:,.0f} rec/s = {ratios[-1]:.2f} of the plain loop")
    shutil.rmtree(workdir, ignore_errors=True)
    return {"contender": "worker_file", "label": "this worker, file transport", "broker": "-", "records": len(records),
            "rates": rates, "plain_rates": plain_rates, "ratios": ratios, "errors": []}


def _growth(cmd: list[str], repeat: int) -> dict:
    """Each contender (``cmd --contender plain|file``) at one point of a cost-growth axis:
    ``repeat`` children each, rates, peak RSS and the largest of every other figure they report."""
    row: dict = {}
    for contender in ("plain", "file"):
        runs = [harness.run([*cmd, "--contender", contender], 300) for _ in range(repeat)]
        rates = [r["records"] / r["seconds"] for r in runs]
        row[contender] = {"rates": rates, "rate": summary(rates)}
        for key in runs[0].keys() - harness.RESULT_KEYS:  # rss_mb, and what else the child measured
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[contender][key] = max(values)
    row["ratio"] = row["file"]["rate"]["median"] / row["plain"]["rate"]["median"]
    return row


def width(widths: list[int], records: int, repeat: int) -> list[dict]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-width-"))
    for features in widths:
        n = min(records, max(500, 1_000_000 // features))
        data = write_data(workdir / f"w{features}.jsonl", n, features)
        cmd = harness.python_cmd("bench.width", "--features", str(features), "--records", str(n), "--data", str(data))
        row = {"features": features, "records": n, **_growth(cmd, repeat)}
        log(f"  {features} features: plain {row['plain']['rate']['median']:,.0f} rec/s, "
            f"file worker {row['file']['rate']['median']:,.0f} rec/s ({row['ratio']:.2f}), "
            f"RSS {row['plain']['rss_mb']:.0f} / {row['file']['rss_mb']:.0f} MB "
            f"(+ learner {row['file'].get('learner_peak_mb', 0):.0f} MB)")
        rows.append(row)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def model_size(heights: list[int], records: int, repeat: int) -> list[dict]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-model-size-"))
    data = write_jsonl(agrawal(records), workdir / "events.jsonl")
    for height in heights:
        cmd = harness.python_cmd("bench.model_size", "--height", str(height), "--records", str(records),
                                 "--data", str(data))
        row = {"height": height, "records": records, **_growth(cmd, repeat)}
        log(f"  height {height}: plain {row['plain']['rate']['median']:,.0f} rec/s, "
            f"file worker {row['file']['rate']['median']:,.0f} rec/s ({row['ratio']:.2f}), model pickle "
            f"{row['plain']['model_bytes'] / 1e6:.2f} MB (write {row['plain']['dump_ms']:.0f} ms, "
            f"read {row['plain']['load_ms']:.0f} ms), RSS {row['plain']['rss_mb']:.0f} / "
            f"{row['file']['rss_mb']:.0f} + {row['file'].get('learner_peak_mb', 0):.0f} MB")
        rows.append(row)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def ensure_quix() -> None:
    """Quix Streams lives in its own virtualenv (it pins confluent-kafka < 2.13); create it once."""
    venv = harness.QUIX_VENV
    if (venv / "bin" / "python").exists():
        return
    log(f"installing Quix Streams into {venv} (once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "quixstreams"], check=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"  could not install Quix Streams ({exc}): its rows will say so")
        shutil.rmtree(venv, ignore_errors=True)


def versions() -> dict:
    import confluent_kafka
    import pika
    import river

    quix = harness.QUIX_VENV / "bin" / "python"
    quix_version = None
    if quix.exists():
        res = subprocess.run([str(quix), "-c", "import quixstreams; print(quixstreams.__version__)"],
                             capture_output=True, text=True, timeout=60)
        quix_version = res.stdout.strip() or None
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    return {"python": platform.python_version(), "river": river.__version__,
            "confluent_kafka": confluent_kafka.__version__, "pika": pika.__version__, "quixstreams": quix_version,
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "load_at_start": load}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line, not a caller of main()
        pin_hash_seed("bench")
        harness.interruptible()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few records, one repetition (a smoke run)")
    parser.add_argument("--records", type=int, help="records per measurement (default 30,000; quick 1,000)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 5; quick 1)")
    parser.add_argument("--only", action="append", help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--brokers", default=None, help="comma-separated: tansu, kafka (default both; quick: tansu)")
    parser.add_argument("--contenders", help=f"Kafka contenders to run (default all): {', '.join(contenders.CONTENDERS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    n = args.records or (1_000 if args.quick else 30_000)
    repeat = args.repeat or (1 if args.quick else 5)
    only = {s for item in (args.only or SECTIONS) for s in item.split(",")}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    brokers = (args.brokers or ("tansu" if args.quick else "tansu,kafka")).split(",")
    names = args.contenders.split(",") if args.contenders else list(contenders.CONTENDERS)
    if "kafka" in only and any(c.startswith("quix") for c in names) and not args.quick:
        ensure_quix()

    started = time.monotonic()
    records = agrawal(n)
    values = harness.encode(records)
    results: dict = {"meta": {**versions(), "records": n, "repeat": repeat, "quick": args.quick,
                              "model": " | ".join(next(iter(s)) for s in REFERENCE_PIPELINE),
                              "brokers": brokers, "started": time.strftime("%Y-%m-%d %H:%M:%S")}}
    throughput: list[dict] = []
    if "limit" in only:
        log("== the limit: plain river loop per model family")
        results["limit"] = limit(records, repeat, slow_records=min(n, 300 if args.quick else 3_000))
    if "file" in only:
        log("== this worker on the file transport")
        throughput.append(file_worker(records, repeat))
    if "minibatch" in only:
        log("== the mini-batch path against the per-record limit")
        sizes = [1000] if args.quick else [500, 1000, 2000]
        results["minibatch"] = minibatch.measure(records, sizes, min(repeat, 3), lambda m: log(m.strip()))
    latencies: list[dict] = []
    for i, name in enumerate(brokers):
        if not only & {"kafka", "latency", "scaling"}:
            break
        if "kafka" in only:
            cpus = harness.off_learner_cpus(name)
            where = "anywhere" if cpus is None else "on CPU " + ",".join(map(str, sorted(cpus)))
            log(f"== Kafka contenders on {name} (the broker {where})")
            results["meta"].setdefault("broker_cpus", {})[name] = None if cpus is None else sorted(cpus)
            with harness.broker(name, cpus) as (bootstrap, consumer_conf):
                throughput += contenders.measure(name, bootstrap, consumer_conf, records, values, names, repeat, log)
        if not only & {"latency", "scaling"}:
            continue
        log(f"== starting {name}")
        with harness.broker(name) as (bootstrap, consumer_conf):
            if "latency" in only:
                latencies += _latency(name, bootstrap, consumer_conf, records, values, throughput, args.quick)
            if "scaling" in only and i == 0:
                log(f"== scaling on {name}: 1 vs 2 processes, 4 partitions")
                results["scaling"] = _scaling(name, bootstrap, consumer_conf, agrawal(2 * n, seed=7), repeat,
                                              idle_stop=0.5 if args.quick else 2.0)
    if "rabbitmq" in only:
        log("== RabbitMQ: this worker beside a plain asynchronous pika loop")
        results["rabbitmq"] = rabbitmq_bench.section(records, values, repeat, log)
        throughput += results["rabbitmq"]["rows"]
    results["throughput"] = throughput
    results["latency"] = latencies
    if "width" in only:
        log("== cost growth with record width")
        widths = [10, 100] if args.quick else [10, 100, 1000]
        results["width"] = width(widths, n, 1 if args.quick else 2)
    if "model_size" in only:
        log("== cost growth with model size")
        heights = [6, 9] if args.quick else list(model_size_bench.HEIGHTS)
        results["model_size"] = model_size(heights, min(n, 20_000), 1 if args.quick else 2)
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    paths = write_all(results, args.out)
    log(f"== done in {results['meta']['duration_s']:.0f} s: " + ", ".join(str(p) for p in paths))
    return 0


def _latency(broker: str, bootstrap: str, consumer_conf: dict, records: list, values: list, throughput: list,
             quick: bool) -> list[dict]:
    """At half the worker's maximum rate (the goals), and at a low rate (the floor: batching, linger, commits).

    The maximum is taken in the latency setup itself (:func:`_capacity`): half of the maximum
    measured alone would be no "half load" on 2 cores, where the feeder and the reader take
    ~35 % of one.
    """
    rows = []
    modes = (("at_least_once", "worker_alo"), ("exactly_once", "worker_eos"))
    for delivery, short in modes[1:] if quick else modes:  # quick: the exactly-once path only
        alone = _max_rate(throughput, broker, short) or _probe_rate(broker, bootstrap, consumer_conf, records, values, short)
        top = _capacity(broker, bootstrap, consumer_conf, delivery, records, alone, quick)
        for load, rate in [("half", top / 2)] + ([] if quick else [("low", LOW_RATE)]):
            seconds, warmup = (2.0, 1.0) if quick else (13.0, latency.WARMUP)
            log(f"== latency on {broker}, {delivery}, at {rate:,.0f} rec/s for {seconds:.0f} s ({warmup:.0f} s not counted)")
            try:
                lat = latency.measure(bootstrap, consumer_conf, delivery, rate, seconds, records, warmup=warmup)
            except harness.ChildFailed as exc:
                lat = {"delivery": delivery, "rate": rate, "error": str(exc)}
            lat.update(broker=broker, load=load, max_rate=top, max_rate_alone=alone, floor=_floor(
                bootstrap, consumer_conf, delivery, rate, seconds, records, warmup))
            rows.append(lat)
            log(f"  p50 {lat.get('p50_ms') or 0:.1f} ms, p99 {lat.get('p99_ms') or 0:.1f} ms; "
                f"the relay: p50 {lat['floor'].get('p50_ms') or 0:.1f} ms, p99 {lat['floor'].get('p99_ms') or 0:.1f} ms")
    return rows


def _floor(bootstrap: str, consumer_conf: dict, delivery: str, rate: float, seconds: float, records: list,
           warmup: float) -> dict:
    """The same rate through :mod:`bench.relay` (nothing done to the records): the floor under the worker's latency."""
    try:
        got = latency.measure(bootstrap, consumer_conf, delivery, rate, seconds, records, warmup=warmup, contender="relay")
    except harness.ChildFailed as exc:
        return {"error": str(exc)}
    return {k: got[k] for k in ("p50_ms", "p99_ms", "max_ms", "received", "sent")}


def _capacity(broker: str, bootstrap: str, consumer_conf: dict, delivery: str, records: list, alone: float,
              quick: bool) -> float:
    """The worker's maximum rate with the feeder and the reader on its cores: the predictions per
    second that arrive while the feeder offers more than that. First 1.5x the rate alone, then
    1.2x the first result (a feeder sending far above the worker's rate takes more of the
    CPU it shares with the worker). A run that delivered what was offered only bounds the
    capacity from below; the runs that fell short of the offer (saturated) are averaged, as
    single runs vary by ±25 % on these machines. (Taking the larger of two saturated runs,
    26,000 against 17,200 records/s once, put the "half load" above what the worker could
    take: its p50 was the backlog, 1 s.)"""
    runs: list[tuple[float, float]] = []  # (offered, delivered)
    offered = 1.5 * alone
    for _ in range(1 if quick else 2):
        log(f"== worker capacity with the feeder and reader on {broker}, {delivery}: offered {offered:,.0f} rec/s")
        try:
            seconds, warmup = (3.0, 1.0) if quick else (8.0, latency.WARMUP)
            got = latency.measure(bootstrap, consumer_conf, delivery, offered, seconds, records, warmup=warmup)["throughput"]
        except harness.ChildFailed as exc:
            log(f"  not measured ({exc})")
            break
        log(f"  {got:,.0f} rec/s delivered")
        runs.append((offered, got))
        offered = 1.2 * got
    if not runs:
        log("  half load is taken from the rate alone")
        return alone
    best = capacity(runs)
    log(f"  capacity {best:,.0f} rec/s (alone: {alone:,.0f})")
    return best


def capacity(runs: list[tuple[float, float]], short: float = 0.95) -> float:
    """The maximum rate from (offered, delivered) runs: the mean of those that delivered less
    than ``short`` of the offer, but no less than what any other run delivered.

    >>> capacity([(60_000, 26_000), (31_200, 17_200)])
    21600.0
    >>> capacity([(60_000, 20_000), (24_000, 23_900)])  # the offer was taken: at least that
    23900.0
    """
    saturated = [got for offered, got in runs if got < short * offered]
    floor = max((got for offered, got in runs if got >= short * offered), default=0.0)
    return max(floor, statistics.mean(saturated)) if saturated else floor


def _max_rate(rows: list[dict], broker: str, contender: str) -> float | None:
    for row in rows:
        if row["broker"] == broker and row["contender"] == contender and row["rates"]:
            return statistics.median(row["rates"])
    return None


def _probe_rate(broker: str, bootstrap: str, consumer_conf: dict, records: list, values: list, contender: str) -> float:
    rows = contenders.measure(broker, bootstrap, consumer_conf, records, values, [contender], 1, log)
    if not rows[0]["rates"]:
        raise SystemExit(f"could not measure the worker's maximum rate: {rows[0]['errors']}")
    return rows[0]["rates"][0]


def _scaling(broker: str, bootstrap: str, consumer_conf: dict, records: list, repeat: int, idle_stop: float) -> list[dict]:
    """1 vs 2 workers, once with the default learner process (a worker is then two OS processes,
    already on both cores) and once with ``learner: inline`` (one OS process per worker)."""
    values = harness.encode(records)
    rows = []
    for learner in scaling.LEARNERS:
        runs: dict[int, list[float]] = {1: [], 2: []}
        errors = []
        for _ in range(repeat):
            for processes in (1, 2):
                try:
                    res = scaling.measure(bootstrap, consumer_conf, values, processes, idle_stop, learner=learner)
                except harness.ChildFailed as exc:
                    errors.append(str(exc))
                    log(f"  learner {learner}, {processes} worker(s): FAILED ({exc})")
                    continue
                runs[processes].append(res["rate"])
                log(f"  learner {learner}, {processes} worker(s): {res['rate']:,.0f} rec/s "
                    f"(records per worker {res['per_process']})")
        ratios = [b / a for a, b in zip(runs[1], runs[2])]
        rows.append({"broker": broker, "learner": learner, "records": len(records), "delivery": "exactly_once",
                     "one": runs[1], "two": runs[2], "ratios": ratios, "ratio": summary(ratios) if ratios else None,
                     "errors": errors})
    return rows


if __name__ == "__main__":
    sys.exit(main())
