"""DistributionDrift: the shared windows against their definition, batching, snapshots."""

import math
import pickle
import random

import numpy as np
import pytest

from worker.monitoring.drift import _KS_C, DistributionDrift, _chi2_quantile

REFERENCE, WINDOW, EVERY = 700, 300, 50


def stream(n: int, seed: int = 3) -> list[dict]:
    """Numeric, integer and categorical features that shift part-way, with missing values,
    a feature missing from some records, a value that is no number and a late new feature."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        late = i > n // 2
        x = {"a": rng.gauss(2.0 if late else 0.0, 1), "b": rng.randrange(5), "c": rng.choice("xyzw" if late else "xyz")}
        if rng.random() < 0.05:
            x["a"] = None
        if rng.random() < 0.03:
            del x["b"]
        if rng.random() < 0.01:
            x["a"] = "oops"
        if rng.random() < 0.01:
            x["d"] = 1.0
        out.append(x)
    return out


def feed(xs: list[dict], batch: int, test: str = "psi", snapshot_at: int | None = None) -> tuple[DistributionDrift, list]:
    d = DistributionDrift(reference_size=REFERENCE, warmup=100, window=WINDOW, check_every=EVERY, test=test)
    events = []
    for start in range(0, len(xs), batch):
        ids = list(range(start, min(len(xs), start + batch)))
        events += d.update_many(xs[start : start + batch], ids, ids)
        if snapshot_at is not None and start <= snapshot_at < start + batch:
            d = pickle.loads(pickle.dumps(d))  # what a snapshot and a restore do
    return d, events


@pytest.mark.parametrize("test", ["psi", "ks"])
def test_the_same_events_and_statistics_whatever_the_batching_and_through_a_snapshot(test):
    xs = stream(12_000)
    base, base_events = feed(xs, 1, test)
    assert [e["event"] for e in base_events].count("drift") >= 2  # the shift is seen (a and c)
    for batch, snapshot_at in ((37, None), (500, 6_000), (5_000, 5_000), (500, 50)):
        d, events = feed(xs, batch, test, snapshot_at)
        assert [(e["event"], e["feature"], e["position"]) for e in events] == [
            (e["event"], e["feature"], e["position"]) for e in base_events]
        assert d.statistics() == pytest.approx(base.statistics(), abs=1e-12)


def test_each_window_counts_the_bins_of_its_last_values_and_tests_them_as_defined():
    xs = stream(5_000)
    d, _ = feed(xs, 500)
    assert set(d.watches) == {"a", "b", "c", "d"}  # ("d": in 1 % of the records, missing in the others)
    last = xs[-WINDOW:]
    n_ref = REFERENCE
    for name, w in d.watches.items():
        bins = w.bin([x.get(name) for x in last])  # each watch's own binning, value by value
        assert w.counts.tolist() == np.bincount(bins, minlength=w.n_bins).tolist()
        assert sorted(w.ring.tolist()) == sorted(bins.tolist())
        assert w.filled == WINDOW
    a, c = d.watches["a"], d.watches["c"]
    assert a.numeric and not c.numeric
    # "oops" and None both land in a's missing bin
    assert a.counts[a.missing_bin] == sum(1 for x in last if not isinstance(x["a"], float))

    # the statistic of the last check, recomputed by hand from the window it saw
    d2 = DistributionDrift(reference_size=REFERENCE, warmup=100, window=WINDOW, check_every=EVERY)
    upto = 100 + REFERENCE + 20 * EVERY  # exactly at a check
    d2.update_many(xs[:upto], list(range(upto)), list(range(upto)))
    for name, w in d2.watches.items():
        counts = np.bincount(w.bin([x.get(name) for x in xs[upto - WINDOW : upto]]), minlength=w.n_bins)
        p = counts / WINDOW + 1e-4
        q = w.reference + 1e-4
        psi = sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q))
        assert w.statistic == pytest.approx(psi, rel=1e-12, abs=1e-15)
    ks = DistributionDrift(reference_size=REFERENCE, warmup=100, window=WINDOW, check_every=EVERY, test="ks")
    ks.update_many(xs[:upto], list(range(upto)), list(range(upto)))
    w = ks.watches["a"]
    counts = np.bincount(w.bin([x.get("a") for x in xs[upto - WINDOW : upto]]), minlength=w.n_bins)
    assert w.statistic == max(abs(c - r) for c, r in zip(np.cumsum(counts / WINDOW), np.cumsum(w.reference)))
    assert ks.watches["c"].statistic == pytest.approx(d2.watches["c"].statistic)  # categorical: PSI either way
    # the alarm threshold is never below the noise floor of the test
    assert _chi2_quantile(a.n_bins - 1) * (1 / WINDOW + 1 / n_ref) > 0
    assert _KS_C * math.sqrt((WINDOW + n_ref) / (WINDOW * n_ref)) > 0


def test_prediction_drift_watches_plain_values():
    rng = random.Random(1)
    values = [rng.random() + (0.5 if i > 4_000 else 0.0) for i in range(8_000)]
    d = DistributionDrift("prediction", reference_size=1_000, window=1_000, check_every=100)
    events = d.update_many(values, list(range(8_000)), list(range(8_000)))
    assert [e["event"] for e in events] == ["drift"] and 4_000 < events[0]["position"] < 4_600
    w = d.watches["prediction"]
    assert w.counts.tolist() == np.bincount(w.bin(values[-1_000:]), minlength=w.n_bins).tolist()
