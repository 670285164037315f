"""Prequential model-quality metrics, cumulative and over a rolling window.

Updated once per batch from plain lists (no per-record metric objects): a confusion
count for classification, running sums for regression, and a bounded deque of recent
outcomes for the rolling window. Metrics are derived only when a report is asked for.

>>> q = ClassificationQuality(window=2)
>>> q.update_many([1, 0, 1], [1, 1, 1], [{1: 0.9, 0: 0.1}, {1: 0.6, 0: 0.4}, {1: 0.8, 0: 0.2}])
>>> r = q.report()
>>> r["cumulative"]["accuracy"], r["rolling"]["accuracy"], r["cumulative"]["n"]
(0.6666666666666666, 0.5, 3)
>>> rq = RegressionQuality(window=10)
>>> rq.update_many([1.0, 2.0, 3.0], [1.5, 2.0, 2.0])
>>> rq.report()["cumulative"]["mae"]
0.5
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any

import numpy as np

_EPS = 1e-15
_log = math.log
_FLOAT = frozenset([float])


def _cross_entropy(y: Any, proba: dict) -> float:
    """Exactly river's ``metrics.CrossEntropy``: -log of the true label's clamped probability,
    and 0 when the model gave no probability for that label at all."""
    p = proba.get(y)
    if p is None:
        return 0.0
    if p != p:  # a model that outputs NaN: not scored (river's metric would turn NaN for good)
        return None  # type: ignore[return-value]
    return -_log(min(max(p, _EPS), 1 - _EPS))


def _cross_entropies(ys: list, probas: list) -> list:
    """:func:`_cross_entropy` of each record (None where the model gave no probabilities),
    in one numpy pass when every true label has a float probability (the common case).

    >>> _cross_entropies([1, 1], [{1: 0.5}, {0: 0.5, 1: float("nan")}])
    [0.6931471805599453, None]
    >>> _cross_entropies([1, 0, 1], [{1: 0.5}, None, {0: 1.0}])
    [0.6931471805599453, None, 0.0]
    """
    ps = [p.get(y) if p is not None else None for y, p in zip(ys, probas)]
    if not _FLOAT.issuperset(map(type, ps)):  # no probabilities, none for the label, or not floats
        return [_cross_entropy(y, p) if p is not None else None for y, p in zip(ys, probas)]
    arr = np.array(ps, dtype=np.float64)
    losses = (-np.log(np.clip(arr, _EPS, 1 - _EPS))).tolist()
    if np.isnan(arr).any():  # NaN probabilities are not scored
        return [None if v != v else v for v in losses]
    return losses


def _classification_metrics(confusion: dict, n: int, logloss_sum: float, n_proba: int) -> dict[str, float]:
    if n == 0:
        return {"n": 0}
    correct = sum(c for (y, p), c in confusion.items() if y == p)
    per_class_tp: Counter = Counter()
    per_class_true: Counter = Counter()
    per_class_pred: Counter = Counter()
    for (y, p), c in confusion.items():
        per_class_true[y] += c
        per_class_pred[p] += c
        if y == p:
            per_class_tp[y] += c
    labels = {y for y in per_class_true} | {p for p in per_class_pred if p is not None}
    f1s = []
    for label in labels:
        tp = per_class_tp[label]
        denom = per_class_true[label] + per_class_pred[label]
        f1s.append(2 * tp / denom if denom else 0.0)
    out = {"n": n, "accuracy": correct / n, "f1": sum(f1s) / len(f1s) if f1s else 0.0}
    if n_proba:
        out["log_loss"] = logloss_sum / n_proba
    return out


class ClassificationQuality:
    """Accuracy, macro-averaged F1 and log loss (river's CrossEntropy: clamped to [1e-15, 1 - 1e-15])."""

    def __init__(self, window: int):
        self.n = 0
        self.confusion: Counter[tuple[Any, Any]] = Counter()
        self.logloss_sum = 0.0
        self.n_proba = 0
        self.recent: deque[tuple[Any, Any, float | None]] = deque(maxlen=window)

    def update_many(self, ys: list, preds: list, probas: list | None = None) -> None:
        pairs = list(zip(ys, preds))
        self.confusion.update(pairs)
        if probas is None:
            self.recent.extend(zip(ys, preds, [None] * len(ys)))
        else:
            losses = _cross_entropies(ys, probas)
            self.logloss_sum += sum([v for v in losses if v is not None])
            self.n_proba += len(losses) - losses.count(None)
            self.recent.extend(zip(ys, preds, losses))
        self.n += len(ys)


    def report(self) -> dict[str, dict[str, float]]:
        window: dict = {}
        ll_sum, n_ll = 0.0, 0
        for y, p, ll in self.recent:
            window[(y, p)] = window.get((y, p), 0) + 1
            if ll is not None:
                ll_sum += ll
                n_ll += 1
        return {
            "cumulative": _classification_metrics(self.confusion, self.n, self.logloss_sum, self.n_proba),
            "rolling": _classification_metrics(window, len(self.recent), ll_sum, n_ll),
        }


def _regression_metrics(n: int, sum_abs: float, sum_sq: float, sum_y: float, sum_y2: float) -> dict[str, float]:
    if n == 0:
        return {"n": 0}
    ss_tot = sum_y2 - sum_y * sum_y / n
    return {
        "n": n,
        "mae": sum_abs / n,
        "rmse": math.sqrt(sum_sq / n),
        "r2": 1.0 - sum_sq / ss_tot if ss_tot > 0 else 0.0,
    }


class RegressionQuality:
    """MAE, RMSE and R² (over the same records, prequentially)."""

    def __init__(self, window: int):
        self.n = 0
        self.sums = [0.0, 0.0, 0.0, 0.0]  # |e|, e², y, y²
        self.invalid = 0  # NaN or infinite predictions (not scored)
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)

    def update_many(self, ys: list, preds: list, probas: list | None = None) -> None:
        s_abs, s_sq, s_y, s_y2 = self.sums
        append = self.recent.append
        n = 0
        for y, p in zip(ys, preds):
            e = y - (p if p is not None else 0.0)
            if e != e or e in (math.inf, -math.inf):  # NaN/inf prediction: counted apart, not scored
                self.invalid += 1
                continue
            n += 1
            s_abs += abs(e)
            s_sq += e * e
            s_y += y
            s_y2 += y * y
            append((y, e))
        self.sums = [s_abs, s_sq, s_y, s_y2]
        self.n += n

    def report(self) -> dict[str, dict[str, float]]:
        s = [0.0, 0.0, 0.0, 0.0]
        for y, e in self.recent:
            s[0] += abs(e)
            s[1] += e * e
            s[2] += y
            s[3] += y * y
        cumulative = _regression_metrics(self.n, *self.sums)
        if self.invalid:
            cumulative["invalid_predictions"] = self.invalid
        return {"cumulative": cumulative, "rolling": _regression_metrics(len(self.recent), *s)}


class ScoreQuality:
    """Clustering and anomaly detection have no target: report the output distribution."""

    def __init__(self, window: int):
        self.n = 0
        self.recent: deque[float] = deque(maxlen=window)

    def update_many(self, ys: list, preds: list, probas: list | None = None) -> None:
        self.recent.extend(preds)
        self.n += len(preds)


    def report(self) -> dict[str, dict[str, float]]:
        values = sorted(v for v in self.recent if isinstance(v, int | float))
        rolling: dict[str, float] = {"n": len(values)}
        if values:
            rolling["mean"] = sum(values) / len(values)
            rolling["p95"] = values[min(len(values) - 1, int(0.95 * len(values)))]
        return {"cumulative": {"n": self.n}, "rolling": rolling}


def quality_for(task: str, window: int) -> ClassificationQuality | RegressionQuality | ScoreQuality:
    if task == "classification":
        return ClassificationQuality(window)
    if task == "regression":
        return RegressionQuality(window)
    return ScoreQuality(window)
