"""Drift detection: concept drift on the error stream, data and prediction drift on distributions.

:class:`ConceptDrift` wraps any ``river.drift`` detector and is fed one error per labelled
record, inside the learning loop, so that a policy acting on it (reset, challenger) takes
effect at the same record whatever the batching (replays stay exact).

:class:`DistributionDrift` watches value distributions: each input feature (data drift) or
the model's output (prediction drift). The first ``reference_size`` values form the reference;
numeric values are binned at the reference's quantiles, categorical ones over the
``max_categories`` most frequent reference values plus one shared bucket, and missing values
have a bin of their own. A sliding window of the latest ``window`` values is kept as bin
indices in a ring buffer (bounded memory whatever the cardinality) and compared with the
reference every ``check_every`` values by PSI or by the KS distance between the binned
distributions. An alarm is raised when the statistic crosses the threshold (never below the
level that sampling noise alone reaches with probability 1e-6, so many bins do not mean
false alarms) and cleared when it falls under half of it.

>>> d = ConceptDrift({"drift.ADWIN": {"delta": 0.002}})
>>> fired = [i for i, e in enumerate([0.0] * 1000 + [1.0] * 1000) if d.update(e)]
>>> 1000 < fired[0] < 1100, d.last_direction
(True, 'degradation')

>>> import random
>>> rng = random.Random(1)
>>> dd = DistributionDrift(reference_size=500, window=500, check_every=100)
>>> xs = [{"a": rng.gauss(0, 1), "c": rng.choice("xy")} for _ in range(3000)]
>>> xs += [{"a": rng.gauss(2, 1), "c": rng.choice("xy")} for _ in range(1000)]
>>> events = dd.update_many(xs, list(range(4000)), list(range(4000)))
>>> [(e["event"], e["feature"], e["detector"], e["position"]) for e in events]
[('drift', 'a', 'PSI', 3199)]
"""

from __future__ import annotations

import functools
import math
import operator
from collections import Counter
from typing import Any

import numpy as np

from worker.models.spec import build_estimator

_NUMBER = (int, float)
_EPS = 1e-4
_NOISE_P = 1e-6  # thresholds are never below the statistic's (1 - 1e-6) quantile under no change
_KS_C = math.sqrt(-0.5 * math.log(_NOISE_P / 2))


class ConceptDrift:
    """A ``river.drift`` detector on the error stream (0/1 for classifiers, |error| for regressors).

    ``update(error) -> bool`` says whether to raise an alarm. With ``degradation_only`` (the
    default) a detection where the error went *down* (a model still improving) is not an
    alarm; the detector still adapts. ``last_*`` describe the last detection.
    """

    signal = "concept"

    def __init__(self, spec: dict, degradation_only: bool = True, key: str = "monitor.drift.concept.detector"):
        self.spec = spec
        self.degradation_only = degradation_only
        self.detector = build_estimator(spec, key=key)
        self.name = type(self.detector).__name__
        self.threshold = next(
            (getattr(self.detector, a) for a in ("delta", "threshold", "alpha", "drift_threshold")
             if isinstance(getattr(self.detector, a, None), int | float)),
            None,
        )
        self._sum, self._n = 0.0, 0  # error since the last detection
        self.last_before: float | None = None
        self.last_after: float | None = None
        self.last_direction = "unknown"

    def update(self, error: float) -> bool:
        det = self.detector
        det.update(error)
        self._sum += error
        self._n += 1
        if not det.drift_detected:
            return False
        # mean error since the last detection vs the detector's own estimate after its cut
        before = self._sum / self._n
        self._sum, self._n = 0.0, 0
        after = getattr(det, "estimation", None)
        self.last_before, self.last_after = before, after
        self.last_direction = "unknown" if after is None else ("degradation" if after > before else "improvement")
        return not (self.degradation_only and self.last_direction == "improvement")

    def observe(self, y: Any, prediction: Any, regression: bool) -> bool:
        """Feed one labelled record's error (absolute for regression, 0/1 otherwise); True on an alarm.

        A NaN or infinite error (an overflowing regressor) is not fed.
        """
        if regression:
            err = abs(y - prediction) if prediction is not None else abs(y)
            if err - err != 0:
                return False
        else:
            err = 0.0 if prediction == y else 1.0
        return self.update(err)

    def event(self, record_id: Any, position: int) -> dict[str, Any]:
        return {
            "event": "drift",
            "signal": self.signal,
            "detector": self.name,
            "record_id": record_id,
            "position": position,
            "statistic": self.last_after,
            "threshold": self.threshold,
            "direction": self.last_direction,
            "previous": self.last_before,
        }

    def update_many(self, values: list, ids: list, positions: list) -> list[dict[str, Any]]:
        """Offline convenience: feed many errors, return the alarms as events."""
        return [self.event(ids[i], positions[i]) for i, v in enumerate(values) if self.update(v)]


@functools.lru_cache(maxsize=1024)
def _chi2_quantile(dof: int) -> float:
    from scipy.stats import chi2  # (half a second to import: not in the learner process, which never tests)

    return float(chi2.ppf(1 - _NOISE_P, dof))


class _Watch:
    """One watched value stream: its reference bins and its sliding window."""

    def __init__(self, name: str, reference: list, bins: int, max_categories: int, window: int):
        self.name = name
        numbers = [v for v in reference if type(v) in _NUMBER]
        self.numeric = len(numbers) >= 0.9 * sum(1 for v in reference if v is not None) and bool(numbers)
        if self.numeric:
            qs = np.quantile(np.asarray(numbers, dtype=float), np.linspace(0, 1, bins + 1)[1:-1])
            self.edges = np.unique(qs)
            self.n_bins = len(self.edges) + 2  # value bins + missing
            self.categories: dict = {}
        else:
            top = Counter(v for v in reference if v is not None).most_common(max_categories)
            self.categories = {v: i for i, (v, _) in enumerate(top)}
            self.edges = np.empty(0)
            self.n_bins = len(self.categories) + 2  # categories + other + missing
        self.missing_bin = self.n_bins - 1
        ref = np.bincount(self.bin(reference), minlength=self.n_bins).astype(float)
        self.reference = ref / ref.sum()
        self.reference_list = self.reference.tolist()
        self.ring = np.zeros(window, dtype=np.int32)
        self.counts = np.zeros(self.n_bins, dtype=np.int64)
        self.filled = 0
        self.ptr = 0
        self.alarm = False
        self.statistic = 0.0

    def bin(self, values: list) -> np.ndarray:
        if self.numeric:
            try:
                arr = np.array(values, dtype=float)
            except (TypeError, ValueError):
                arr = np.array([v if type(v) in _NUMBER else math.nan for v in values], dtype=float)
            out = np.searchsorted(self.edges, arr, side="right")
            out[np.isnan(arr)] = self.missing_bin
            return out
        other = self.n_bins - 2
        cats = self.categories
        return np.array(
            [self.missing_bin if v is None else cats.get(v, other) for v in values], dtype=np.int64
        ) if values else np.zeros(0, dtype=np.int64)

    def add(self, values: list) -> None:
        idx = self.bin(values)
        w = len(self.ring)
        if len(idx) >= w:
            idx = idx[-w:]
            self.ring[:] = np.roll(idx, self.ptr)
            self.counts = np.bincount(idx, minlength=self.n_bins)
            self.filled = w
            return
        slots = (self.ptr + np.arange(len(idx))) % w
        if self.filled == w:
            self.counts -= np.bincount(self.ring[slots], minlength=self.n_bins)
        self.ring[slots] = idx
        self.counts += np.bincount(idx, minlength=self.n_bins)
        self.ptr = (self.ptr + len(idx)) % w
        self.filled = min(w, self.filled + len(idx))

    def test(self, kind: str, n_ref: int) -> tuple[str, float, float]:
        """(detector name, statistic, noise floor) of the current window against the reference.

        Plain Python over a dozen bins: cheaper than numpy's per-call overhead at this size.
        """
        counts = self.counts.tolist()
        n = self.filled
        reference = self.reference_list
        if kind == "ks" and self.numeric:
            stat = cur_cdf = ref_cdf = 0.0
            for c, r in zip(counts, reference):
                cur_cdf += c / n
                ref_cdf += r
                stat = max(stat, abs(cur_cdf - ref_cdf))
            return "KS", stat, _KS_C * math.sqrt((n + n_ref) / (n * n_ref))
        stat = 0.0
        bins = 0
        for c, r in zip(counts, reference):
            p, q = c / n + _EPS, r + _EPS
            stat += (p - q) * math.log(p / q)
            bins += c > 0 or r > 0
        return "PSI", stat, _chi2_quantile(max(1, bins - 1)) * (1 / n + 1 / n_ref)


class DistributionDrift:
    """Data drift over the features of ``x`` (or, with ``field``, prediction drift over one value)."""

    def __init__(
        self,
        signal: str = "data",
        reference_size: int = 1000,
        warmup: int = 0,
        window: int = 1000,
        check_every: int = 100,
        test: str = "psi",
        threshold: float | None = None,
        bins: int = 10,
        max_categories: int = 50,
        max_features: int = 200,
    ):
        self.signal = signal
        self.reference_size = reference_size
        self.warmup = warmup
        self.window = window
        self.check_every = min(check_every, window)
        self.test = test
        self.threshold = threshold if threshold is not None else (0.2 if test == "ks" else 0.25)
        self.bins = bins
        _chi2_quantile(max(1, bins - 1))  # imports scipy.stats now (start-up), not at the first test mid-stream
        self.max_categories = max_categories
        self.max_features = max_features
        self.seen = 0
        self._reference: dict[str, list] = {}
        self.watches: dict[str, _Watch] = {}

    @property
    def alarms(self) -> list[str]:
        """Names currently in alarm."""
        return [name for name, w in self.watches.items() if w.alarm]

    def update_many(self, xs: list, ids: list, positions: list) -> list[dict[str, Any]]:
        """Feed a batch (dicts of features, or plain values for prediction drift); return events.

        Tests run every ``check_every`` values counted from the start of the stream, so they
        happen at the same records whatever the batching.
        """
        events: list[dict[str, Any]] = []
        start = 0
        total = len(xs)
        while start < total:
            if self.seen < self.warmup:
                end = min(total, start + self.warmup - self.seen)
            elif self.seen < self.warmup + self.reference_size:
                end = min(total, start + self.warmup + self.reference_size - self.seen)
                self._collect(xs[start:end])
                if self.seen + (end - start) >= self.warmup + self.reference_size:
                    self._build()
            else:
                to_check = self.check_every - (self.seen - self.warmup - self.reference_size) % self.check_every
                end = min(total, start + to_check)
                for w, values in zip(self.watches.values(), self._columns(xs[start:end])):
                    w.add(values)
                if end - start == to_check:
                    self._check(events, ids[end - 1], positions[end - 1])
            self.seen += end - start
            start = end
        return events

    def _columns(self, xs: list) -> list:
        """One list of values per watch, in the order of ``self.watches``."""
        if self.signal == "prediction":
            return [xs]
        names = list(self.watches)
        try:  # every record has every watched feature: all in C
            return [list(c) for c in zip(*map(operator.itemgetter(*names), xs))] if len(names) > 1 else [
                [x[names[0]] for x in xs]
            ]
        except KeyError:
            return [[x.get(name) for x in xs] for name in names]

    def _collect(self, xs: list) -> None:
        ref = self._reference
        if self.signal == "prediction":
            ref.setdefault("prediction", []).extend(xs)
            return
        for x in xs:
            for name in x:
                if name not in ref and len(ref) < self.max_features:
                    ref[name] = []
            for name, values in ref.items():
                values.append(x.get(name))

    def _build(self) -> None:
        for name, values in self._reference.items():
            # features first seen late in the reference count as missing before that
            values[:0] = [None] * (self.reference_size - len(values))
            self.watches[name] = _Watch(name, values, self.bins, self.max_categories, self.window)
        self._reference = {}

    def _check(self, events: list, record_id: Any, position: int) -> None:
        if self.seen == 0:
            return
        for name, w in self.watches.items():
            if w.filled < self.window:
                continue
            detector, stat, floor = w.test(self.test, self.reference_size)
            w.statistic = stat
            threshold = max(self.threshold, floor)
            if not w.alarm and stat > threshold:
                w.alarm = True
                events.append(self._event("drift", detector, name, stat, threshold, record_id, position))
            elif w.alarm and stat < threshold / 2:
                w.alarm = False
                events.append(self._event("drift_cleared", detector, name, stat, threshold / 2, record_id, position))

    def _event(self, kind: str, detector: str, name: str, stat: float, threshold: float, rid: Any, pos: int) -> dict:
        return {
            "event": kind,
            "signal": self.signal,
            "detector": detector,
            "feature": name if self.signal == "data" else None,
            "record_id": rid,
            "position": pos,
            "statistic": stat,
            "threshold": threshold,
        }

    def statistics(self) -> dict[str, float]:
        """The latest statistic of every watched stream (for the Prometheus gauges)."""
        return {name: w.statistic for name, w in self.watches.items() if w.filled == self.window}
