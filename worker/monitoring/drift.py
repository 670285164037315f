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
false alarms) and cleared when it falls under half of it. The windows of all the watched
streams share one ring and one count vector (:class:`_Windows`): a batch costs a few numpy
calls whatever the number of features.

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
import itertools
import math
import operator
from collections import Counter
from collections.abc import Callable
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
        return det.drift_detected and self._detected()

    def _detected(self) -> bool:
        """The detector has just detected: note what changed; whether that is an alarm."""
        # mean error since the last detection vs the detector's own estimate after its cut
        before = self._sum / self._n
        self._sum, self._n = 0.0, 0
        after = getattr(self.detector, "estimation", None)
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

    def observe_many(self, ys: list, predictions: list, regression: bool,
                     record: Callable[[int], tuple]) -> list[tuple[int, dict[str, Any]]]:
        """:meth:`observe` over many labelled records, in order: ``(index, event)`` of each alarm.
        ``record(index)`` gives that record's ``(id, _, _, _, _, position, ...)`` (asked at alarms only).

        >>> c = ConceptDrift({"drift.ADWIN": {}})
        >>> records = [(f"r{i}", None, None, 1, None, i) for i in range(2000)]
        >>> [(i, e["record_id"], e["direction"]) for i, e in c.observe_many(
        ...     [1] * 2000, [1] * 1000 + [0] * 1000, False, records.__getitem__)]
        [(1023, 'r1023', 'degradation')]
        """
        det = self.detector
        update = det.update
        alarms = []
        for i, (y, prediction) in enumerate(zip(ys, predictions)):
            if regression:
                err = abs(y - prediction) if prediction is not None else abs(y)
                if err - err != 0:
                    continue
            else:
                err = 0.0 if prediction == y else 1.0
            update(err)
            self._sum += err
            self._n += 1
            if det.drift_detected and self._detected():
                r = record(i)
                alarms.append((i, self.event(r[0], r[5])))
        return alarms

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


class _Windows:
    """The sliding windows of every watch of a :class:`DistributionDrift`, as one ring of bin
    indices (``window`` rows, a column per watch) and one vector of counts (each watch's bins
    side by side). Each watch's ``ring`` and ``counts`` become views into them, so the watches
    pickle as before (a snapshot holds no trace of this object) and test their own window.

    A batch is binned at once (the numeric watches by one comparison against all their
    edges) and then added chunk by chunk (``check_every`` values), a handful of numpy calls
    per chunk instead of a dozen per watch. Over Agrawal's 9 numeric features, in batches
    of 500, that took the watch from 1.67 to 1.17 µs per record (best of 7, one process);
    most of what is left is turning the values into one float array.
    """

    def __init__(self, watches: list[_Watch]):
        self.watches = watches
        sizes = [w.n_bins for w in watches]
        self.offsets = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        self.total = int(sum(sizes))
        self.window = len(watches[0].ring)
        self.ring = np.stack([w.ring for w in watches], axis=1)
        self.counts = np.concatenate([w.counts for w in watches]).astype(np.int64)
        for j, w in enumerate(watches):
            w.ring = self.ring[:, j]
            w.counts = self.counts[self.offsets[j] : self.offsets[j] + w.n_bins]
        self.ptr, self.filled = watches[0].ptr, watches[0].filled
        self.names = [w.name for w in watches]
        self.numeric = [j for j, w in enumerate(watches) if w.numeric]
        self.categorical = [j for j, w in enumerate(watches) if not w.numeric]
        self.numeric_names = [self.names[j] for j in self.numeric]
        width = max([len(watches[j].edges) for j in self.numeric], default=0)
        # each numeric watch's edges, padded with +inf (never below a value): row j, its bin is
        # the number of its edges <= the value, as np.searchsorted(edges, v, side="right") gives
        self.edges = np.full((len(self.numeric), width), np.inf)
        for row, j in enumerate(self.numeric):
            self.edges[row, : len(watches[j].edges)] = watches[j].edges
        self.missing = np.array([watches[j].missing_bin for j in self.numeric], dtype=np.int64)
        # for the tests: each watch's bins as a row, padded with empty bins (which add nothing)
        self._cells = (np.repeat(np.arange(len(watches)), sizes), np.concatenate([np.arange(k) for k in sizes]))
        self._shape = (len(watches), max(sizes))
        self.reference = np.zeros(self._shape)
        self.reference[self._cells] = np.concatenate([w.reference for w in watches])
        self._ks = np.array([w.numeric for w in watches])

    def bins(self, xs: list, plain: bool) -> np.ndarray:
        """The bin of every value of ``xs`` for every watch: ``len(xs)`` rows, a column per watch.
        ``plain``: ``xs`` are the values themselves (prediction drift, one watch)."""
        watches = self.watches
        if plain:
            return watches[0].bin(xs)[:, None]
        out = np.empty((len(xs), len(watches)), dtype=np.int64)
        if self.numeric:
            out[:, self.numeric] = self._numeric_bins(xs)
        for j in self.categorical:
            name = self.names[j]
            out[:, j] = watches[j].bin([x.get(name) for x in xs])
        return out

    def _numeric_bins(self, xs: list) -> np.ndarray:
        names = self.numeric_names
        get = operator.itemgetter(*names)
        try:  # every record has every numeric feature: all in C
            rows = list(map(get, xs))
        except KeyError:  # a missing feature: its bin is the missing one
            rows = ([tuple(x.get(name) for name in names) for x in xs] if len(names) > 1
                    else [x.get(names[0]) for x in xs])
        try:
            values = np.fromiter(itertools.chain.from_iterable(rows) if len(names) > 1 else rows, float,
                                 count=len(xs) * len(names)).reshape(len(xs), len(names))
        except (TypeError, ValueError):
            try:  # a missing value (None: NaN, the missing bin)
                values = np.array(rows, dtype=float).reshape(len(xs), len(names))
            except (TypeError, ValueError):  # a value that is no number: each watch bins its column
                columns = zip(*rows) if len(names) > 1 else [rows]
                return np.stack([self.watches[j].bin(list(c)) for j, c in zip(self.numeric, columns)], axis=1)
        out = (values[:, :, None] >= self.edges[None, :, :]).sum(axis=2)
        nan = np.isnan(values)
        if nan.any():
            out = np.where(nan, self.missing, out)
        return out

    def add(self, idx: np.ndarray) -> None:
        """Slide every window over a chunk of bins (rows of :meth:`bins`)."""
        w = self.window
        n = len(idx)
        if n >= w:
            idx = idx[-w:]
            self.ring[:] = np.roll(idx, self.ptr, axis=0)
            self.counts[:] = np.bincount((idx + self.offsets).ravel(), minlength=self.total)
            self.filled = w
        else:
            slots = (self.ptr + np.arange(n)) % w
            if self.filled == w:
                self.counts -= np.bincount((self.ring[slots] + self.offsets).ravel(), minlength=self.total)
            self.ring[slots] = idx
            self.counts += np.bincount((idx + self.offsets).ravel(), minlength=self.total)
            self.ptr = (self.ptr + n) % w
            self.filled = min(w, self.filled + n)
        for watch in self.watches:  # (each watch keeps its own, as a snapshot holds it)
            watch.ptr, watch.filled = self.ptr, self.filled

    def test(self, kind: str, n_ref: int) -> list[tuple[str, float, float]]:
        """(detector name, statistic, noise floor) of each watch's window against its reference:
        PSI, or with ``kind="ks"`` the KS distance for the numeric watches (over the bins in
        order, the missing one last)."""
        n = self.filled
        current = np.zeros(self._shape)
        current[self._cells] = self.counts / n
        ref = self.reference
        p, q = current + _EPS, ref + _EPS
        psi = np.cumsum((p - q) * np.log(p / q), axis=1)[:, -1].tolist()  # (summed in bin order)
        bins = ((current > 0) | (ref > 0)).sum(axis=1).tolist()
        psi_noise = 1 / n + 1 / n_ref
        if kind == "ks" and self._ks.any():
            ks = np.abs(np.cumsum(current, axis=1) - np.cumsum(ref, axis=1)).max(axis=1).tolist()
            ks_floor = _KS_C * math.sqrt((n + n_ref) / (n * n_ref))
            return [("KS", ks[j], ks_floor) if numeric else ("PSI", psi[j], _chi2_quantile(max(1, bins[j] - 1)) * psi_noise)
                    for j, numeric in enumerate(self._ks.tolist())]
        return [("PSI", stat, _chi2_quantile(max(1, used - 1)) * psi_noise) for stat, used in zip(psi, bins)]


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

    _windows: _Windows | None = None  # (also for snapshots taken before it existed)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_windows", None)  # derived: rebuilt from the watches after loading
        return state

    def _joint(self) -> _Windows:
        if self._windows is None:
            self._windows = _Windows(list(self.watches.values()))
        return self._windows

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
        bins = None
        while start < total:
            if self.seen < self.warmup:
                end = min(total, start + self.warmup - self.seen)
            elif self.seen < self.warmup + self.reference_size:
                end = min(total, start + self.warmup + self.reference_size - self.seen)
                self._collect(xs[start:end])
                if self.seen + (end - start) >= self.warmup + self.reference_size:
                    self._build()
            else:
                if not self.watches:  # (nothing was seen in the reference)
                    self.seen += total - start
                    break
                if bins is None:  # the rest of the batch, binned at once
                    windows = self._joint()
                    bins, origin = windows.bins(xs[start:], self.signal == "prediction"), start
                to_check = self.check_every - (self.seen - self.warmup - self.reference_size) % self.check_every
                end = min(total, start + to_check)
                windows.add(bins[start - origin : end - origin])
                if end - start == to_check:
                    self._check(events, ids[end - 1], positions[end - 1])
            self.seen += end - start
            start = end
        return events

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
        windows = self._joint()
        if self.seen == 0 or windows.filled < self.window:
            return
        for (name, w), (detector, stat, floor) in zip(self.watches.items(), windows.test(self.test, self.reference_size)):
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
