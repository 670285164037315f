"""results.json, results.md (tables and the goals of issue 6) and throughput.png from one run."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import summary

#: Goals of the benchmark issue; None = not measured by this suite yet.
ALO_GOAL, EOS_GOAL, QUIX_FACTOR, SCALE_GOAL = 0.9, 0.85, 2.5, 1.7
RABBITMQ_GOAL = 0.9  # this worker on RabbitMQ / a plain asynchronous pika loop
MINI_BATCH_FACTOR, MINI_BATCH_GOAL_SIZE = 3.0, 1000
P99_GOALS_MS = {"at_least_once": 25.0, "exactly_once": 250.0}


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    s = summary(values)
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _maxes(r: dict) -> str:
    top, alone = r.get("max_rate"), r.get("max_rate_alone")
    return "" if top is None else f"{top:,.0f} / {alone:,.0f}" if alone else f"{top:,.0f}"


def _floor(lat: dict) -> str:
    """The relay's p50/p99 at the same rate (bench.relay: the same broker trips, nothing done)."""
    floor = lat.get("floor") or {}
    if floor.get("p99_ms") is None:
        return "-" if not floor.get("error") else "not measured"
    return f"{floor['p50_ms']:.1f}/{floor['p99_ms']:.1f}"


def _transit(lat: dict) -> str:
    """After the worker's produce(): its producer, the broker and the reader."""
    if lat.get("transit_p50_ms") is None:
        return "-"
    return f"{lat['transit_p50_ms']:.1f}/{lat['transit_p99_ms']:.1f}"


def _median(row: dict | None, key: str = "ratios") -> float | None:
    return summary(row[key])["median"] if row and row.get(key) else None


def goals(results: dict) -> list[dict]:
    rows = []
    by = {(r["broker"], r["contender"]): r for r in results.get("throughput", [])}
    for broker in results["meta"]["brokers"]:
        alo, eos, quix = (by.get((broker, c)) for c in ("worker_alo", "worker_eos", "quix_eos"))
        if alo or eos:
            for row, goal, what in ((eos, EOS_GOAL, "exactly-once"), (alo, ALO_GOAL, "at-least-once")):
                m = _median(row)
                rows.append({"goal": f"{what} >= {goal} of the plain loop ({broker})",
                             "measured": None if m is None else f"{m:.2f}", "met": None if m is None else m >= goal})
            e, q = _median(eos), _median(quix)
            rows.append({"goal": f"exactly-once >= {QUIX_FACTOR}x Quix Streams exactly-once ({broker})",
                         "measured": None if e is None or q is None else f"{e / q:.2f}x",
                         "met": None if e is None or q is None else e / q >= QUIX_FACTOR})
    for lat in results.get("latency", []):
        if lat.get("load") != "half":
            continue
        goal = P99_GOALS_MS[lat["delivery"]]
        p99 = lat.get("p99_ms")
        floor = (lat.get("floor") or {}).get("p99_ms")
        measured = None if p99 is None else f"{p99:.1f} ms" + ("" if floor is None else f" (the relay: {floor:.1f} ms)")
        rows.append({"goal": f"p99 < {goal:.0f} ms {lat['delivery'].replace('_', '-')} at half load ({lat['broker']})",
                     "measured": measured, "met": None if p99 is None else p99 < goal})
    for sc in results.get("scaling") or []:
        m = sc["ratio"]["median"] if sc.get("ratio") else None
        rows.append({"goal": f"2 workers >= {SCALE_GOAL}x one ({sc['broker']}, learner: {sc['learner']}, 2 cores "
                     "shared with the broker)",
                     "measured": None if m is None else f"{m:.2f}x", "met": None if m is None else m >= SCALE_GOAL})
    mb = results.get("minibatch")
    if mb:
        for r in mb["rows"]:
            if r["mini_batch"] == MINI_BATCH_GOAL_SIZE:
                stage, whole = r["learner"]["median"], r["worker"]["median"]
                rows.append({"goal": f"opt-in mini-batch path >= {MINI_BATCH_FACTOR:.0f}x the per-record limit "
                             f"(judged on the learner stage; groups of {r['mini_batch']:,})",
                             "measured": f"learner stage {stage:.2f}x; whole worker (file) {whole:.2f}x; labels differing "
                             f"{r['labels_differ']:.1%}", "met": stage >= MINI_BATCH_FACTOR})
    else:
        rows.append({"goal": f"opt-in mini-batch path >= {MINI_BATCH_FACTOR:.0f}x the per-record limit",
                     "measured": "not measured in this run (section minibatch)", "met": None})
    rows.append(_rabbitmq_goal(results.get("rabbitmq")))
    return rows


def _rabbitmq_goal(rb: dict | None) -> dict:
    goal = f"RabbitMQ worker >= {RABBITMQ_GOAL} of a plain async pika loop"
    if rb is None:
        return {"goal": goal, "measured": "not measured in this run (section rabbitmq)", "met": None}
    if not rb.get("worker_over_pika"):
        why = rb.get("error") or "; ".join(e for row in rb["rows"] for e in row["errors"][:1]) or "no result"
        return {"goal": goal, "measured": f"not measured: {why}", "met": None}
    m = summary(rb["worker_over_pika"])
    return {"goal": goal, "measured": f"{_spread(rb['worker_over_pika'])} (median (min-max) of the worker / pika loop "
            f"ratios of {len(rb['worker_over_pika'])} repetition(s))", "met": m["median"] >= RABBITMQ_GOAL}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"`python -m bench{' --quick' if meta['quick'] else ''}` (records {meta['records']:,}, {meta['repeat']} "
        f"repetition(s)), started {meta['started']}, {meta.get('duration_s', '?')} s. Machine: {meta['machine']}; "
        f"load average at start {' '.join(meta.get('load_at_start', []))}. Python {meta['python']}, river {meta['river']}, "
        f"confluent-kafka {meta['confluent_kafka']}, pika {meta.get('pika', '?')}, Quix Streams {meta['quixstreams'] or 'not installed'}.",
        "",
        "Ratios are taken against the plain river loop measured in the same run (for Kafka, the mean of the "
        "plain loops right before and right after each repetition), as median (min-max) over the repetitions. Absolute rates move with the machine's load; the "
        "ratios much less. Kafka timings run from the first record received (after the group join) to the last "
        "commit of outputs and offsets; input topics are filled beforehand.",
    ]
    if results.get("limit"):
        lines += ["", "## The limit: plain river loop (predict_one then learn_one, pre-decoded Agrawal)", "",
                  "| model | records | records/s |", "|---|---:|---:|"]
        for r in results["limit"]:
            lines.append(f"| {r['family']} | {r['records']:,} | {_spread(r['rates'], '{:,.0f}')} |")
    if results.get("throughput"):
        lines += ["", f"## Throughput against the plain loop ({meta['model']})", "",
                  "| contender | broker | records/s | plain loop records/s | ratio to plain loop |",
                  "|---|---|---:|---:|---:|"]
        for r in results["throughput"]:
            if r["rates"]:
                lines.append(f"| {r['label']} | {r['broker']} | {_spread(r['rates'], '{:,.0f}')} | "
                             f"{_spread(r['plain_rates'], '{:,.0f}')} | **{_spread(r['ratios'])}** |")
            else:
                lines.append(f"| {r['label']} | {r['broker']} | not measured: {'; '.join(r['errors'][:1])} | | |")
    if results.get("latency"):
        lines += ["", "## Latency, record to prediction, seen by a read_committed reader of the predictions", "",
                  "Half load: half the worker's maximum rate in this setup (the goals): the predictions per second "
                  "it delivered while the load generator offered more (1.5x its rate alone, then 1.2x that result), "
                  "with the generator and the reader on the same 2 cores (the rate alone, on a pre-filled topic, is given beside it). Low: 1,000 "
                  "records/s (the floor set by batching, linger and commit intervals). Transit: from the worker's "
                  "produce() (the outputs' Kafka timestamps) to the reader. The first seconds of each "
                  "rated phase are not counted (warm-up: the JVM broker's own ramp). The relay: the same rate through "
                  "`bench.relay`, which forwards each record unchanged with the worker's client settings and commit "
                  "interval (no decoding, no model): the floor that the broker, the clients and the shared cores set.",
                  "",
                  "| delivery | broker | load | rate (records/s) | max with feeder / alone | p50 ms | p99 ms | max ms | "
                  "transit p50/p99 ms | the relay p50/p99 ms | received/sent |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["latency"]:
            if r.get("p99_ms") is None:
                lines.append(f"| {r['delivery']} | {r['broker']} | {r.get('load')} | not measured: "
                             f"{r.get('error', 'no predictions')} | | | | | | | |")
                continue
            lines.append(f"| {r['delivery']} | {r['broker']} | {r['load']} | {r['rate']:,.0f} | {_maxes(r)} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {_transit(r)} | {_floor(r)} | {r['received']:,}/{r['sent']:,} |")
    rb = results.get("rabbitmq")
    if rb:
        lines += ["", f"## RabbitMQ: this worker beside a plain asynchronous pika loop ({rb['records']:,} records)", "",
                  "Both read the same records (persistent, pre-filled) from one durable queue on one RabbitMQ node and "
                  "publish their predictions persistent with publisher confirms. The pika loop (`bench/pika_loop.py`: "
                  "one SelectConnection, prefetch "
                  f"{rb.get('pika_prefetch', '?')}) acks each delivery once the broker confirmed its output; the worker "
                  "(1 shard queue behind its x-consistent-hash exchange, at-least-once, probabilities, metrics and drift "
                  "on, file snapshots every 10,000 records) acks once a durable snapshot covers it. Timed from the first "
                  "delivery to the ack covering the last record. Each ratio to the plain loop is taken against the "
                  "plain loops right before and after it; worker / pika loop is taken repetition by repetition.", "",
                  "| contender | records/s | ratio to plain loop |", "|---|---:|---:|"]
        for r in rb["rows"]:
            if r["rates"]:
                lines.append(f"| {r['label']} | {_spread(r['rates'], '{:,.0f}')} | {_spread(r['ratios'])} |")
            else:
                lines.append(f"| {r['label']} | not measured: {'; '.join(r['errors'][:1])} | |")
        lines.append(f"| **worker / pika loop** | | **{_spread(rb['worker_over_pika'])}** |")
    scaling = results.get("scaling") or []
    if scaling:
        sc = scaling[0]
        lines += ["", f"## Scaling: 1 vs 2 workers in one group, 4 partitions, {sc['delivery']} on {sc['broker']}", "",
                  "The machine has 2 cores, shared by the broker and the workers. With `learner: process` (the "
                  "default) one worker is two OS processes and already uses both cores; with `learner: inline` a "
                  "worker is one OS process.", "",
                  "| learner | 1 worker records/s | 2 workers records/s | ratio 2/1 | errors |", "|---|---:|---:|---:|---|"]
        for sc in scaling:
            lines.append(f"| {sc['learner']} | {_spread(sc['one'], '{:,.0f}')} | {_spread(sc['two'], '{:,.0f}')} | "
                         f"**{_spread(sc['ratios'])}** | {'; '.join(sc['errors'][:1]) or '-'} |")
    mb = results.get("minibatch")
    if mb:
        lines += ["", f"## Mini-batch mode (`model.mini_batch`), {mb['model']}, {mb['records']:,} records", "",
                  f"Against the per-record limit (the plain loop) of the same repetition. Learner stage: "
                  f"`Learner.learn` over poll batches of {mb['poll']:,} decoded records (what the learner process "
                  f"runs). Whole worker: the file transport with `limits.batch_size` {mb['poll']:,}; its other stages "
                  "(decoding, validation, drift, quality, encoding) stay per record and cap it. Accuracy: cumulative, "
                  "of the predictions; labels differing: share of predicted labels unlike the record-by-record ones.", "",
                  "| mini_batch | learner stage | whole worker | accuracy | labels differing |", "|---:|---:|---:|---:|---:|"]
        for r in mb["rows"]:
            lines.append(f"| {r['mini_batch'] or 'off'} | {_spread(r['learner_ratios'])}x | {_spread(r['worker_ratios'])}x | "
                         f"{r['accuracy']:.4f} | {r['labels_differ']:.2%} |")
    if results.get("width"):
        lines += ["", "## Cost growth with record width (StandardScaler | LogisticRegression, file worker vs plain loop)", "",
                  "Plain-loop RSS excludes the pre-decoded records it holds; the worker's is the peak RSS of its main "
                  "process + that of its learner process (RSS counts the shared libraries, ~150 MB of it here, in each).", "",
                  "| features | records | plain records/s | worker records/s | ratio | plain RSS MB | worker RSS MB |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["width"]:
            lines.append(f"| {r['features']:,} | {r['records']:,} | {_spread(r['plain']['rates'], '{:,.0f}')} | "
                         f"{_spread(r['file']['rates'], '{:,.0f}')} | {r['ratio']:.2f} | {r['plain']['rss_mb']:.0f} | "
                         f"{_worker_rss(r['file'])} |")
    if results.get("model_size"):
        lines += ["", "## Cost growth with model size (MinMaxScaler | HalfSpaceTrees, 10 trees, file worker vs plain loop)", "",
                  "The model's state grows as 2^height, its work per record more slowly. Pickle: the plain loop's "
                  "model at the end, written and read back once (a snapshot and a restore of the model); snapshot: the "
                  "worker's last one on disk (model and monitors). The worker snapshots every 10,000 records.", "",
                  "| height | records | plain records/s | worker records/s | ratio | pickle MB | write ms | read ms | "
                  "snapshot MB | plain RSS MB | worker RSS MB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["model_size"]:
            p, f = r["plain"], r["file"]
            snapshot = f"{f['snapshot_bytes'] / 1e6:.2f}" if f.get("snapshot_bytes") else "-"
            lines.append(f"| {r['height']} | {r['records']:,} | {_spread(p['rates'], '{:,.0f}')} | "
                         f"{_spread(f['rates'], '{:,.0f}')} | {r['ratio']:.2f} | {p['model_bytes'] / 1e6:.2f} | "
                         f"{p['dump_ms']:.0f} | {p['load_ms']:.0f} | {snapshot} | {p['rss_mb']:.0f} | {_worker_rss(f)} |")
    lines += ["", "## Notes", "",
              "- The machine is shared: other work may have been running during this run (see the load average above); "
              "ratios are taken repetition by repetition to cancel most of it.",
              "- Quix Streams commits every 5 s by default (`commit_interval`); a run here lasts about a second, so "
              "Quix commits once, at the end, while the worker commits every 100 ms and the hand-written loops every "
              "500 records. This favours Quix.",
              "- The worker publishes more per record than the other contenders (class probabilities, model version, "
              "shard, position, timestamp) and also runs its monitors (data drift per feature, prediction drift, "
              "concept drift, rolling metrics) and file snapshots every 10,000 records, as configured by default.",
              "- The worker's learner process runs on a CPU of its own (`cpu_affinity: split`), and it calls a simple "
              "pipeline's steps directly (`worker.models.calls`: river's pipeline dispatch costs ~1.4 µs per record "
              "for StandardScaler | LogisticRegression), while the plain loop and the other contenders call the "
              "pipeline as a user would. `python -m bench.kafka` prints the plain loop calling the steps directly "
              "beside it (~1.1x the plain loop), to tell that part of the worker's ratio apart.",
              "- On tansu every consumer gets `fetch.wait.max.ms=10` besides `session.timeout.ms=6000`: tansu 0.6 holds "
              "each fetch for the full `fetch.wait.max.ms` even when records are waiting (see bench/harness.py)."]
    placed = results["meta"].get("broker_cpus") or {}
    if placed:
        where = "; ".join(f"{name} on {'CPU ' + ','.join(map(str, cpus)) if cpus else 'any CPU'}"
                          for name, cpus in placed.items())
        lines.append(f"- Where the broker ran during the Kafka contenders: {where}. A light broker is kept off the CPU of "
                     "the worker's learner, as a host set up for `split` would keep it, and a heavy one is left "
                     "anywhere, as it leaves the worker's other CPU too little (`bench.harness.off_learner_cpus`, "
                     "with the A/B figures). Latency and scaling run on a broker placed by the system.")
    lines += ["", "## Goals (issue 6)", "", "| goal | measured | met |", "|---|---|---|"]
    for g in results["goals"]:
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['measured'] or '-'} | {met} |")
    return "\n".join(lines) + "\n"


def _worker_rss(row: dict) -> str:
    learner = row.get("learner_peak_mb")
    return f"{row['rss_mb']:.0f}" + (f" + {learner:.0f}" if learner else "")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("throughput", []) if r["ratios"]]
    width = results.get("width") or []
    fig, axes = plt.subplots(1, 2 if width else 1, figsize=(13 if width else 8, 0.45 * len(rows) + 2.5), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['label']} ({r['broker']})" if r["broker"] != "-" else r["label"] for r in rows]
    med = [summary(r["ratios"])["median"] for r in rows]
    lo = [m - min(r["ratios"]) for m, r in zip(med, rows, strict=True)]
    hi = [max(r["ratios"]) - m for m, r in zip(med, rows, strict=True)]
    colors = ["tab:green" if r["contender"].startswith("worker") else "tab:gray" for r in rows]
    ax.barh(range(len(rows)), med, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1, label="plain river loop")
    ax.axvline(EOS_GOAL, color="tab:red", linestyle="--", linewidth=1, label=f"goal {EOS_GOAL} (exactly-once)")
    ax.axvline(ALO_GOAL, color="tab:orange", linestyle=":", linewidth=1, label=f"goal {ALO_GOAL} (at-least-once)")
    ax.set_xlabel("throughput / plain river loop (median, min-max)")
    ax.set_title("Throughput against the limit, same run")
    ax.legend(fontsize=7, loc="lower right")
    if width:
        ax2 = axes[0][1]
        feats = [r["features"] for r in width]
        for key, label in (("plain", "plain river loop"), ("file", "this worker (file)")):
            ax2.plot(feats, [r[key]["rate"]["median"] for r in width], marker="o", label=label)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("features per record")
        ax2.set_ylabel("records/s")
        ax2.set_title("Cost growth with record width")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["goals"] = goals(results)
    paths = [out / "results.json", out / "results.md", out / "throughput.png"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths
