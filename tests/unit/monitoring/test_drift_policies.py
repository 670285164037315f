"""Drift policies through the shard: reset, challenger promotion, freeze; exact under any batching."""

from __future__ import annotations

import itertools
import pickle
import random

import orjson
import pytest
from river import datasets

from worker.config import load_settings
from worker.learning import Engine

TREE = [{"tree.HoeffdingAdaptiveTreeClassifier": {"seed": 1}}]


def agrawal_change(n: int, change_at: int) -> list[bytes]:
    first = iter(datasets.synth.Agrawal(classification_function=0, seed=7))
    second = iter(datasets.synth.Agrawal(classification_function=2, seed=8))
    return [
        orjson.dumps({"id": i, "x": x, "y": int(y)})
        for i, (x, y) in enumerate(next(first) if i < change_at else next(second) for i in range(n))
    ]


def shifted_salary(n: int, change_at: int) -> list[bytes]:
    out = []
    for i, (x, y) in enumerate(itertools.islice(datasets.synth.Agrawal(seed=3), n)):
        if i >= change_at:
            x["salary"] += 60_000.0
        out.append(orjson.dumps({"id": i, "x": x, "y": int(y)}))
    return out


def engine(drift: dict, pipeline=TREE) -> Engine:
    return Engine(load_settings(data={"model": {"pipeline": pipeline}, "monitor": {"drift": drift}}, env={}))


def run(eng: Engine, lines: list[bytes], batch: int, state=None):
    shard = eng.shard("s", state)
    preds, events = [], []
    for start in range(0, len(lines), batch):
        chunk = lines[start : start + batch]
        out = shard.process(chunk, list(range(start, start + len(chunk))), now=0.0)
        preds += [orjson.loads(v) for _, v in out.predictions]
        events += [orjson.loads(v) for _, v in out.drift]
    return shard, preds, events


CHALLENGER = {
    "concept": {"policy": "challenger"},
    "challenger": {"window": 300, "min_records": 300, "margin": 0.02},
    "prediction": {"enabled": False},
}


def test_challenger_is_promoted_after_a_change_and_versions_follow():
    lines = agrawal_change(16_000, 8_000)
    shard, preds, events = run(engine(CHALLENGER), lines, 500)
    kinds = [e["event"] for e in events]
    assert "challenger_started" in kinds and "promotion" in kinds
    start = next(e for e in events if e["event"] == "challenger_started")
    promo = next(e for e in events if e["event"] == "promotion")
    assert 8_000 <= start["position"] < 10_000
    assert promo["position"] > start["position"]
    assert promo["challenger_score"] > promo["champion_score"]
    assert (promo["previous_version"], promo["model_version"]) == (1, 2)
    assert shard.state.model_version == 2
    # predictions carry the version of the model that made them
    assert {p["model_version"] for p in preds if p["position"] <= promo["position"]} == {1}
    assert {p["model_version"] for p in preds if p["position"] > promo["position"]} == {2}


def test_reset_policy_starts_a_fresh_model():
    lines = agrawal_change(12_000, 6_000)
    shard, preds, events = run(engine({"concept": {"policy": "reset"}, "prediction": {"enabled": False}}), lines, 500)
    resets = [e for e in events if e["event"] == "model_reset"]
    assert resets and resets[0]["position"] >= 6_000
    after = [p for p in preds if p["position"] == resets[0]["position"] + 1]
    assert after[0]["model_version"] == 2
    # a fresh tree knows no class yet: its first prediction has no probabilities
    assert after[0]["proba"] == {}


@pytest.mark.parametrize("drift", [CHALLENGER, {"data": {"policy": "freeze", "check_every": 100}, "concept": {"policy": "reset"}}])
def test_policies_are_exact_whatever_the_batching(drift):
    """Replays after a restart re-batch the records: decisions must land on the same records."""
    lines = agrawal_change(10_000, 5_000) if "challenger" in drift else shifted_salary(6_000, 3_000)
    reference = None
    for batch in (1000, 333, 57):
        _, preds, events = run(engine(drift), lines, batch)
        got = ([(p["position"], p["prediction"], p["proba"], p["model_version"]) for p in preds],
               [{k: v for k, v in e.items() if k != "ts"} for e in events])
        if reference is None:
            reference = got
            assert got[1], "the scenario must produce events"
        else:
            assert got == reference


def test_snapshot_mid_challenge_continues_exactly():
    lines = agrawal_change(12_000, 5_000)
    eng = engine(CHALLENGER)
    _, full_preds, full_events = run(eng, lines, 500)
    challenge = next(e for e in full_events if e["event"] == "challenger_started")["position"]
    cut = challenge + 200  # the challenger is learning in shadow here
    shard, first_preds, _ = run(eng, lines[:cut], 500)
    assert shard.state.challenger is not None
    restored = pickle.loads(pickle.dumps(shard.state))
    second = eng.shard("s", restored)
    rest = []
    for start in range(cut, len(lines), 400):
        chunk = lines[start : start + 400]
        out = second.process(chunk, list(range(start, start + len(chunk))), now=0.0)
        rest += [orjson.loads(v) for _, v in out.predictions]
    assert first_preds + rest == full_preds


def test_freeze_stops_learning_during_a_data_drift_alarm():
    lines = shifted_salary(6_000, 3_000)
    drift = {"data": {"policy": "freeze", "check_every": 100}, "concept": {"detector": None}, "prediction": {"enabled": False}}
    pipeline = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
    shard, preds, events = run(engine(drift, pipeline), lines, 500)
    alarm = next(e for e in events if e["event"] == "drift" and e["signal"] == "data")
    assert alarm["feature"] == "salary" and 3_000 <= alarm["position"] < 5_000
    # the scaler saw exactly the records up to and including the alarm (nothing after it is learned)
    scaler = shard.state.model["StandardScaler"]
    assert scaler.counts["salary"] == alarm["position"] + 1


def test_data_drift_detects_a_shift_within_2000_records_and_stays_quiet_before():
    lines = shifted_salary(8_000, 4_000)
    _, _, events = run(engine({"concept": {"detector": None}, "prediction": {"enabled": False}},
                              [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]), lines, 500)
    data = [e for e in events if e["signal"] == "data"]
    assert data and data[0]["event"] == "drift" and data[0]["feature"] == "salary"
    assert 4_000 <= data[0]["position"] < 6_000
    for key in ("detector", "statistic", "threshold", "record_id", "shard", "model_version", "ts"):
        assert key in data[0]


def test_categorical_drift_is_bounded_in_memory():
    rng = random.Random(0)
    lines = [orjson.dumps({"id": i, "x": {"c": f"v{rng.randrange(100_000)}"}, "y": 1}) for i in range(3_000)]
    shard, _, _ = run(engine({"data": {"max_categories": 20}, "prediction": {"enabled": False}},
                             [{"preprocessing.OneHotEncoder": {}}, {"linear_model.LogisticRegression": {}}]), lines, 500)
    watch = shard.state.data_drift.watches["c"]
    assert len(watch.categories) == 20 and watch.n_bins == 22
