"""Drift detectors that plug into the monitor stage.

A detector here is anything with ``signal``, ``name`` and
``update_many(values, ids, positions) -> list[dict]`` returning drift events (without the
shard and model fields, which the shard fills in). :class:`ConceptDrift` wraps any
``river.drift`` detector and feeds it the model's per-record error.

>>> from worker.monitoring.drift import ConceptDrift
>>> d = ConceptDrift({"drift.ADWIN": {"delta": 0.002}})
>>> events = d.update_many([0.0] * 1000 + [1.0] * 1000, list(range(2000)), list(range(2000)))
>>> [(e["signal"], e["detector"], e["direction"]) for e in events][:1]
[('concept', 'ADWIN', 'degradation')]
>>> 1000 < events[0]["position"] < 1100
True
"""

from __future__ import annotations

from typing import Any, Protocol

from worker.models.spec import build_estimator


class Detector(Protocol):
    signal: str
    name: str

    def update_many(self, values: list, ids: list, positions: list) -> list[dict[str, Any]]: ...


class ConceptDrift:
    """A ``river.drift`` detector on the error stream (0/1 for classifiers, |error| for regressors).

    With ``degradation_only`` (the default), a detection where the error went *down* (a model
    still improving) is not reported; the detector still adapts its window.
    """

    signal = "concept"

    def __init__(self, spec: dict, degradation_only: bool = True, key: str = "monitor.drift.detector"):
        self.spec = spec
        self.degradation_only = degradation_only
        self.detector = build_estimator(spec, key=key)
        self.name = type(self.detector).__name__
        self._sum, self._n = 0.0, 0  # error since the last alarm
        self._threshold = next(
            (getattr(self.detector, a) for a in ("delta", "threshold", "alpha", "drift_threshold")
             if isinstance(getattr(self.detector, a, None), int | float)),
            None,
        )

    def update_many(self, values: list, ids: list, positions: list) -> list[dict[str, Any]]:
        det = self.detector
        update = det.update
        has_estimation = hasattr(det, "estimation")
        events = []
        total, count = self._sum, self._n
        for i, v in enumerate(values):
            update(v)
            total += v
            count += 1
            if det.drift_detected:
                # mean error since the last alarm vs the detector's estimate after the cut
                before = total / count
                total, count = 0.0, 0
                after = det.estimation if has_estimation else None
                direction = "unknown" if after is None else ("degradation" if after > before else "improvement")
                if self.degradation_only and direction == "improvement":
                    continue
                events.append(
                    {
                        "signal": self.signal,
                        "detector": self.name,
                        "record_id": ids[i],
                        "position": positions[i],
                        "statistic": after,
                        "threshold": self._threshold,
                        "direction": direction,
                        "previous": before,
                    }
                )
        self._sum, self._n = total, count
        return events
