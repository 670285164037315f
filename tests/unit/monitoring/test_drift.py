"""worker.monitoring.drift: ConceptDrift fires on an abrupt change, not on a stationary stream.

Streams are seeded, so these are deterministic; bounds are on records, never on time.
"""

from __future__ import annotations

import random

import pytest

from worker.monitoring.drift import ConceptDrift


def alarms(det: ConceptDrift, errors: list[float]) -> list[int]:
    """Indices at which the detector raised an alarm (works with both update APIs)."""
    if hasattr(det, "update"):
        return [i for i, e in enumerate(errors) if det.update(e)]
    idx = list(range(len(errors)))
    return [e["position"] for e in det.update_many(errors, idx, idx)]


def bernoulli(rng: random.Random, p: float, n: int) -> list[float]:
    return [1.0 if rng.random() < p else 0.0 for _ in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("spec", [{"drift.ADWIN": {"delta": 0.002}}, {"drift.PageHinkley": {}}])
def test_abrupt_degradation_is_detected_within_a_bounded_delay(seed, spec):
    rng = random.Random(seed)
    change = 2000
    errors = bernoulli(rng, 0.1, change) + bernoulli(rng, 0.6, 1000)
    fired = alarms(ConceptDrift(spec), errors)
    after = [i for i in fired if i >= change]
    assert after, f"no alarm after the change at {change}"
    assert after[0] - change <= 300
    assert not [i for i in fired if i < change]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_stationary_stream_raises_no_alarm(seed):
    rng = random.Random(seed)
    assert alarms(ConceptDrift({"drift.ADWIN": {"delta": 0.002}}), bernoulli(rng, 0.25, 6000)) == []


def test_regression_errors_drift_too():
    rng = random.Random(9)
    errors = [abs(rng.gauss(0, 1)) for _ in range(1500)] + [abs(rng.gauss(4, 1)) for _ in range(500)]
    fired = alarms(ConceptDrift({"drift.ADWIN": {}}), errors)
    assert fired and 1500 <= fired[0] <= 1700


@pytest.mark.parametrize("seed", [1, 2])
def test_degradation_only_suppresses_improvements(seed):
    rng = random.Random(seed)
    improving = bernoulli(rng, 0.6, 2000) + bernoulli(rng, 0.05, 2000)
    assert alarms(ConceptDrift({"drift.ADWIN": {"delta": 0.002}}, degradation_only=True), improving) == []
    both = alarms(ConceptDrift({"drift.ADWIN": {"delta": 0.002}}, degradation_only=False), improving)
    assert both and both[0] >= 2000


def test_detector_name_and_signal():
    d = ConceptDrift({"drift.PageHinkley": {}})
    assert d.name == "PageHinkley" and d.signal == "concept"
