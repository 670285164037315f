"""Drift quality: detection delay, false alarms, and recovery with the challenger policy.

    python -m bench.drift [--stationary 200000] [--plot docs/img/drift.png] [--json FILE]

Everything runs through the worker's own processing path (``worker.learning.Engine``) with the
default configuration unless a detector is named:

1. **Concept drift** on river's Agrawal (classification function 0 -> 2) and SEA (variant
   0 -> 3) with an abrupt change: the model's per-record error stream is recorded once, then
   every concept detector (ADWIN, PageHinkley, KSWIN, DDM, EDDM, HDDM_A, HDDM_W, with
   degradation-only alarms) reads the same stream; the delay is the number of records from the
   change to the first alarm after it.
2. **False alarms**: the same detectors on ``--stationary`` records of the stationary streams.
3. **Data drift**: a shift of one numeric feature (Agrawal ``salary`` +40,000, a third of its
   range) and, separately, of a categorical one (``elevel`` re-weighted) with PSI and KS;
   false alarms of both over the stationary streams.
4. **Recovery**: rolling accuracy (window 1,000) after the change with ``alert`` and with
   ``challenger``: records until it is back within 2 points of its pre-change level.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import orjson
from river import datasets

from worker.config import load_settings
from worker.learning import Engine
from worker.monitoring.drift import ConceptDrift

DETECTORS = {
    "ADWIN": {"drift.ADWIN": {"delta": 0.001}},
    "PageHinkley": {"drift.PageHinkley": {}},
    "KSWIN": {"drift.KSWIN": {"seed": 1}},
    "DDM": {"drift.binary.DDM": {}},
    "EDDM": {"drift.binary.EDDM": {}},
    "HDDM_A": {"drift.binary.HDDMA": {}},
    "HDDM_W": {"drift.binary.HDDMW": {}},
    "FHDDM": {"drift.binary.FHDDM": {}},
}
MODEL = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
TREE = [{"tree.HoeffdingAdaptiveTreeClassifier": {"seed": 1}}]


def generator(name: str, variant: int, seed: int):
    if name == "agrawal":
        return datasets.synth.Agrawal(classification_function=variant, seed=seed)
    return datasets.synth.SEA(variant=variant, seed=seed)


def stream(name: str, n: int, change_at: int | None, before: int, after: int, seed: int) -> list[bytes]:
    """JSON lines of ``n`` records; the concept changes abruptly at ``change_at`` (None: never)."""
    first = iter(generator(name, before, seed))
    second = iter(generator(name, after, seed + 1))
    out = []
    for i in range(n):
        x, y = next(first) if change_at is None or i < change_at else next(second)
        out.append(orjson.dumps({"id": i, "x": {str(k): v for k, v in x.items()}, "y": int(y)}))
    return out


def shifted(n: int, change_at: int | None, seed: int, kind: str) -> list[bytes]:
    """Agrawal records whose ``salary`` (numeric) or ``elevel`` (categorical) distribution shifts."""
    rng = random.Random(seed)
    out = []
    for i, (x, y) in enumerate(itertools.islice(datasets.synth.Agrawal(seed=seed), n)):
        if change_at is not None and i >= change_at:
            if kind == "numeric":
                x["salary"] += 40_000.0
            else:
                x["elevel"] = rng.choice([0, 0, 0, 1, 4])
        if kind == "categorical":
            x["elevel"] = str(x["elevel"])
        out.append(orjson.dumps({"id": i, "x": x, "y": int(y)}))
    return out


def run(lines: list[bytes], overrides: dict | None = None, pipeline=MODEL) -> tuple[list[dict], list[float], list[dict]]:
    """The worker over ``lines``: (drift-output events, per-record errors, metrics events)."""
    data = {"model": {"pipeline": pipeline}, "monitor": {"every_records": 100, "window": 1000}, "telemetry": {"port": None}}
    for key, value in (overrides or {}).items():
        data["monitor"].setdefault("drift", {})[key] = value
    settings = load_settings(data=data, env={})
    shard = Engine(settings).shard("bench")
    events, errors, metrics = [], [], []
    for start in range(0, len(lines), 500):
        chunk = lines[start : start + 500]
        out = shard.process(chunk, list(range(start, start + len(chunk))), now=0.0)
        events += [orjson.loads(v) for _, v in out.drift]
        metrics += [orjson.loads(v) for _, v in out.metrics]
        errors += [0.0 if (p := orjson.loads(v))["prediction"] == orjson.loads(chunk[p["position"] - start])["y"] else 1.0
                   for _, v in out.predictions]
    return events, errors, metrics


def first_alarm(errors: list[float], spec: dict, after: int) -> tuple[int | None, int]:
    """(delay of the first alarm at or after ``after``, alarms before ``after``)."""
    det = ConceptDrift(spec)
    early = 0
    for i, e in enumerate(errors):
        if det.update(e):
            if i >= after:
                return i - after, early
            early += 1
    return None, early


def count_alarms(errors: list[float], spec: dict) -> int:
    det = ConceptDrift(spec)
    return sum(det.update(e) for e in errors)


def recovery(metrics: list[dict], change_at: int, tolerance: float = 0.02) -> tuple[float, int | None]:
    """(pre-change rolling accuracy, records after the change until back within ``tolerance``)."""
    before = [m["rolling"]["accuracy"] for m in metrics if change_at - 2000 <= m["position"] <= change_at]
    level = sum(before) / len(before)
    dipped = False
    for m in metrics:
        if m["position"] <= change_at:
            continue
        acc = m["rolling"]["accuracy"]
        if acc < level - tolerance:
            dipped = True
        elif dipped:
            return level, m["position"] - change_at
    return level, None if dipped else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stationary", type=int, default=200_000)
    parser.add_argument("--plot", default="docs/img/drift.png")
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict = {"concept": {}, "false_alarms": {}, "data": {}, "recovery": {}}
    change_at, n = 20_000, 40_000
    # 1-2. concept drift: delays and false alarms per detector
    cases = {"agrawal 0->2": ("agrawal", 0, 2), "sea 0->3": ("sea", 0, 3)}
    stationary_errors = {}
    results["default_stationary"] = {}
    for label, (name, before, after) in cases.items():
        _, errors, _ = run(stream(name, n, change_at, before, after, seed=7))
        calm_events, calm, _ = run(stream(name, args.stationary, None, before, before, seed=11))
        stationary_errors[label] = calm
        results["default_stationary"][label] = {
            signal: sum(1 for e in calm_events if e["event"] == "drift" and e["signal"] == signal)
            for signal in ("concept", "data", "prediction")
        }
        for det, spec in DETECTORS.items():
            delay, early = first_alarm(errors, spec, change_at)
            results["concept"].setdefault(det, {})[label] = {"delay": delay, "alarms_before_change": early}
            results["false_alarms"].setdefault(det, {})[label] = count_alarms(calm, spec)
    # 3. data drift through the worker, default settings (PSI) and KS
    for kind in ("numeric", "categorical"):
        changed = shifted(n, change_at, seed=3, kind=kind)
        calm = shifted(args.stationary, None, seed=5, kind=kind)
        for test in ("psi", "ks"):
            overrides = {"concept": {"detector": None}, "prediction": {"enabled": False}, "data": {"test": test}}
            events, _, _ = run(changed, overrides)
            alarms = [e for e in events if e["event"] == "drift" and e["signal"] == "data"]
            after = [e["position"] - change_at for e in alarms if e["position"] >= change_at]
            calm_events, _, _ = run(calm, overrides)
            results["data"][f"{kind} {test}"] = {
                "delay": min(after) if after else None,
                "features": sorted({e["feature"] for e in alarms if e["position"] >= change_at}),
                "alarms_before_change": len(alarms) - len(after),
                "false_alarms": sum(1 for e in calm_events if e["event"] == "drift"),
            }
    # 4. recovery after a change: alert vs challenger (and reset)
    lines = stream("agrawal", 60_000, change_at, 0, 2, seed=7)
    curves = {}
    for policy in ("alert", "challenger", "reset"):
        _, _, metrics = run(lines, {"concept": {"policy": policy}, "data": {"enabled": False}, "prediction": {"enabled": False}}, pipeline=TREE)
        level, rec = recovery(metrics, change_at)
        results["recovery"][policy] = {"pre_change_accuracy": level, "records_to_recover": rec}
        curves[policy] = [(m["position"], m["rolling"]["accuracy"]) for m in metrics]
    report(results, args.stationary)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(curves, change_at, args.plot, results["recovery"])


def report(results: dict, stationary: int) -> None:
    print(f"## Concept drift (abrupt change at record 20,000; false alarms over {stationary:,} stationary records)\n")
    print("| detector | agrawal delay | sea delay | early alarms | false alarms agrawal | false alarms sea |")
    print("|---|---|---|---|---|---|")
    for det, by in results["concept"].items():
        fa = results["false_alarms"][det]
        ag, sea = by["agrawal 0->2"], by["sea 0->3"]
        print(f"| {det} | {ag['delay']} | {sea['delay']} | {ag['alarms_before_change'] + sea['alarms_before_change']} "
              f"| {fa['agrawal 0->2']} | {fa['sea 0->3']} |")
    print(f"\nFalse alarms of the default configuration (ADWIN, PSI data and prediction drift) over {stationary:,} "
          "stationary records, by signal:")
    for label, counts in results["default_stationary"].items():
        print(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("\n## Data drift (default settings; change at record 20,000)\n")
    print("| shift, test | delay | features | early alarms | false alarms |")
    print("|---|---|---|---|---|")
    for label, r in results["data"].items():
        print(f"| {label} | {r['delay']} | {', '.join(r['features'])} | {r['alarms_before_change']} | {r['false_alarms']} |")
    print("\n## Recovery of rolling accuracy (HoeffdingAdaptiveTree, Agrawal 0 -> 2)\n")
    print("| policy | pre-change accuracy | records to recover within 2 points |")
    print("|---|---|---|")
    for policy, r in results["recovery"].items():
        print(f"| {policy} | {r['pre_change_accuracy']:.3f} | {r['records_to_recover']} |")


def plot(curves: dict, change_at: int, path: str, recovery_results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for policy, points in curves.items():
        xs, ys = zip(*points)
        rec = recovery_results[policy]["records_to_recover"]
        ax.plot(xs, ys, label=f"{policy} (recovered after {rec} records)" if rec is not None else f"{policy} (not recovered)")
    ax.axvline(change_at, color="grey", linestyle="--", label="concept change")
    level = recovery_results["alert"]["pre_change_accuracy"]
    ax.axhspan(level - 0.02, level, color="grey", alpha=0.15, label="within 2 points of pre-change level")
    ax.set_xlabel("record")
    ax.set_ylabel("rolling accuracy (last 1,000)")
    ax.set_title("Recovery after an abrupt concept change (Agrawal 0 -> 2)")
    ax.legend(loc="lower right")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
