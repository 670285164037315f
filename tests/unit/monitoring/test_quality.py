"""worker.monitoring.quality: our batched metrics agree with river's own metrics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import metrics

from worker.monitoring.quality import ClassificationQuality, RegressionQuality, ScoreQuality, quality_for

LABELS = ["a", "b", "c", 1]


@st.composite
def classified(draw, binary: bool = False, extremes: bool = True):
    labels = [True, False] if binary else LABELS
    n = draw(st.integers(1, 120))
    ys = draw(st.lists(st.sampled_from(labels), min_size=n, max_size=n))
    ps = draw(st.lists(st.sampled_from(labels), min_size=n, max_size=n))
    probas = []
    for _ in range(n):
        # extremes: zero probabilities, classes left out, empty dicts (a model before its first learn)
        w = draw(st.lists(st.floats(0.0 if extremes else 0.01, 1.0), min_size=len(labels), max_size=len(labels)))
        keep = draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels))) if extremes else [True] * len(labels)
        total = sum(v for v, k in zip(w, keep) if k)
        probas.append({lab: v / total for lab, v, k in zip(labels, w, keep) if k} if total > 0 else {})
    return ys, ps, probas


def river_values(ys, ps, probas, binary=False):
    acc, f1, ce = metrics.Accuracy(), metrics.MacroF1(), metrics.CrossEntropy()
    ll = metrics.LogLoss()
    for y, p, pr in zip(ys, ps, probas):
        acc.update(y, p)
        f1.update(y, p)
        ce.update(y, pr)
        if binary:
            ll.update(y, pr)
    return acc.get(), f1.get(), ce.get(), ll.get() if binary else None


@given(classified(), st.integers(1, 200), st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_classification_cumulative_and_rolling_match_river(data, window, batches):
    ys, ps, probas = data
    q = ClassificationQuality(window)
    step = max(1, len(ys) // batches)
    for i in range(0, len(ys), step):
        q.update_many(ys[i:i + step], ps[i:i + step], probas[i:i + step])
    r = q.report()
    acc, f1, ce, _ = river_values(ys, ps, probas)
    assert r["cumulative"]["n"] == len(ys)
    assert r["cumulative"]["accuracy"] == pytest.approx(acc, rel=1e-12, abs=1e-12)
    assert r["cumulative"]["f1"] == pytest.approx(f1, rel=1e-9, abs=1e-12)
    assert r["cumulative"]["log_loss"] == pytest.approx(ce, rel=1e-9, abs=1e-12)
    k = min(window, len(ys))
    acc, f1, ce, _ = river_values(ys[-k:], ps[-k:], probas[-k:])
    assert r["rolling"]["n"] == k
    assert r["rolling"]["accuracy"] == pytest.approx(acc, rel=1e-12, abs=1e-12)
    assert r["rolling"]["f1"] == pytest.approx(f1, rel=1e-9, abs=1e-12)
    assert r["rolling"]["log_loss"] == pytest.approx(ce, rel=1e-9, abs=1e-12)


@given(classified(binary=True, extremes=False))
@settings(max_examples=100, deadline=None)
def test_binary_log_loss_matches_river_log_loss(data):
    ys, ps, probas = data
    q = ClassificationQuality(10)
    q.update_many(ys, ps, probas)
    *_, ll = river_values(ys, ps, probas, binary=True)
    assert q.report()["cumulative"]["log_loss"] == pytest.approx(ll, rel=1e-6, abs=1e-9)


def test_log_loss_is_river_cross_entropy_even_for_a_missing_class():
    """river's CrossEntropy counts a proba without the true class ({} before the first learn) as 0,
    but {label: 0.0} as -log(1e-15); the worker's log_loss follows it exactly."""
    q = ClassificationQuality(5)
    q.update_many([True, "a", "a"], [None, "b", "b"], [{}, {"b": 1.0}, {"b": 1.0, "a": 0.0}])
    ce = metrics.CrossEntropy()
    for y, p in [(True, {}), ("a", {"b": 1.0}), ("a", {"b": 1.0, "a": 0.0})]:
        ce.update(y, p)
    assert q.report()["cumulative"]["log_loss"] == pytest.approx(ce.get(), rel=1e-12)


def test_no_proba_means_no_log_loss_and_empty_is_n_zero():
    q = ClassificationQuality(5)
    assert q.report() == {"cumulative": {"n": 0}, "rolling": {"n": 0}}
    q.update_many([1, 0], [1, 1])
    assert "log_loss" not in q.report()["cumulative"]


finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=150), st.integers(1, 200), st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_regression_cumulative_and_rolling_match_river(pairs, window, batches):
    ys = [y for y, _ in pairs]
    ps = [p for _, p in pairs]
    q = RegressionQuality(window)
    step = max(1, len(ys) // batches)
    for i in range(0, len(ys), step):
        q.update_many(ys[i:i + step], ps[i:i + step])
    r = q.report()

    def river(ys, ps):
        mae, rmse, r2 = metrics.MAE(), metrics.RMSE(), metrics.R2()
        for y, p in zip(ys, ps):
            mae.update(y, p), rmse.update(y, p), r2.update(y, p)
        return mae.get(), rmse.get(), r2.get()

    k = min(window, len(ys))
    for got, (y_, p_) in ((r["cumulative"], (ys, ps)), (r["rolling"], (ys[-k:], ps[-k:]))):
        mae, rmse, r2 = river(y_, p_)
        assert got["mae"] == pytest.approx(mae, rel=1e-9, abs=1e-9)
        assert got["rmse"] == pytest.approx(rmse, rel=1e-9, abs=1e-9)
        spread = max(y_) - min(y_)
        if len(y_) > 1 and spread > 1e-3 * max(1.0, max(abs(v) for v in y_)):  # R² is ill-conditioned otherwise
            assert got["r2"] == pytest.approx(r2, rel=1e-6, abs=1e-6)


def test_regression_diverged_model_does_not_poison_the_metrics():
    """NaN/inf predictions are counted apart and not scored; a None prediction counts as 0."""
    q = RegressionQuality(10)
    q.update_many([1.0, 2.0, 3.0, 4.0], [None, float("nan"), float("inf"), 5.0])
    r = q.report()
    assert r["cumulative"]["n"] == 2 and r["cumulative"]["invalid_predictions"] == 2
    assert r["cumulative"]["mae"] == pytest.approx((1.0 + 1.0) / 2)
    assert all(v == v for v in r["cumulative"].values()) and r["rolling"]["n"] == 2


def test_score_quality_and_factory():
    q = ScoreQuality(3)
    q.update_many([], [0.1, 0.9, 0.5, 0.7])
    r = q.report()
    assert r["cumulative"]["n"] == 4 and r["rolling"]["n"] == 3
    assert r["rolling"]["mean"] == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert isinstance(quality_for("classification", 5), ClassificationQuality)
    assert isinstance(quality_for("regression", 5), RegressionQuality)
    assert isinstance(quality_for("anomaly", 5), ScoreQuality)


def test_batched_cross_entropy_equals_the_per_record_one():
    """The numpy pass (all float probabilities) and the per-record path agree, NaN included."""
    import math
    import random

    from worker.monitoring.quality import _cross_entropies, _cross_entropy

    rng = random.Random(3)
    ys = [rng.choice([0, 1]) for _ in range(400)]
    floats = [{0: 1 - p, 1: p} for p in (rng.choice([0.0, 1.0, 1e-20, rng.random()]) for _ in range(400))]
    floats[17][1] = floats[17][0] = math.nan
    mixed = [*floats[:200], None, {0: 1.0}, {1: 1}, *floats[200:]]  # no probabilities, no label, an int
    for probas, labels in ((floats, ys), (mixed, [*ys[:200], 1, 1, 1, *ys[200:]])):
        batched = _cross_entropies(labels, probas)
        one_by_one = [_cross_entropy(y, p) if p is not None else None for y, p in zip(labels, probas)]
        assert [v is None for v in batched] == [v is None for v in one_by_one]
        assert all(a == pytest.approx(b, rel=1e-12, abs=0) for a, b in zip(batched, one_by_one) if b is not None)
    assert _cross_entropies(ys[:1], [floats[17]]) == [None]
