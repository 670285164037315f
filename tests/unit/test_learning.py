"""worker.learning: the prequential step, positions, replay, dead letters, monitor outputs, counters."""

from __future__ import annotations

import orjson
import pytest
from river import linear_model, preprocessing

from worker.config import DriftSettings, load_settings
from worker.learner import make_step
from worker.learning import Engine


def concept_drift(spec: dict) -> dict:
    """``monitor.drift`` with this concept detector (the settings moved under ``concept`` in the drift issue)."""
    return {"concept": {"detector": spec}} if "concept" in DriftSettings.model_fields else {"detector": spec}


def engine(**data) -> Engine:
    return Engine(load_settings(data=data, env={}))


def lines(n: int, start: int = 0, label=True) -> list[bytes]:
    return [orjson.dumps({"id": i, "x": {"a": float(i % 7), "b": float(i % 3)}, "y": (i % 2 == 0) if label else None})
            for i in range(start, start + n)]


def preds(out) -> list[dict]:
    return [orjson.loads(v) for _, v in out.predictions]


def test_prediction_shape_classification():
    shard = engine(record={"key": "user"}).shard("s0")
    out = shard.process([b'{"id": "a", "user": "u1", "x": {"f": 1.0}, "y": true, "ts": 5}'], [10], now=99.0)
    ((msg_key, value),) = out.predictions
    rec = orjson.loads(value)
    assert list(rec) == ["id", "key", "prediction", "proba", "model_version", "shard", "position", "ts"]
    assert (rec["id"], rec["key"], rec["shard"], rec["position"], rec["ts"], rec["model_version"]) == ("a", "u1", "s0", 10, 99.0, 1)
    assert msg_key == b"u1"  # the record key is the message key (for partitioned sinks)


def test_timestamp_field_is_published_when_configured():
    shard = engine(record={"timestamp": "ts"}).shard("s0")
    rec = preds(shard.process([b'{"x": {"f": 1.0}, "ts": 1700000000.25}'], [0], now=1.0))[0]
    assert rec["ts"] == 1700000000.25 and rec["id"] is None and rec["key"] is None


@pytest.mark.parametrize(
    ("task", "pipeline", "extra"),
    [
        ("regression", [{"linear_model.LinearRegression": {}}], None),
        ("clustering", [{"cluster.KMeans": {"seed": 1}}], None),
        ("anomaly", [{"anomaly.HalfSpaceTrees": {"seed": 1}}], "score"),
    ],
)
def test_prediction_shape_other_tasks(task, pipeline, extra):
    shard = engine(model={"task": task, "pipeline": pipeline}).shard("s0")
    rec = preds(shard.process([b'{"x": {"f": 0.5}, "y": 1.0}'], [0], now=0.0))[0]
    expected = ["id", "key", "prediction"] + ([extra] if extra else []) + ["model_version", "shard", "position", "ts"]
    assert list(rec) == expected


def test_bad_records_become_dead_letters_and_processing_continues():
    e = engine()
    shard = e.shard("s0")
    values = [lines(1)[0], b"not json", b'{"x": {"a": NaN}}', b"\xff\xfe", lines(1, 4)[0]]
    out = shard.process(values, [0, 1, 2, 3, 4], now=0.0)
    assert [p["position"] for p in preds(out)] == [0, 4]
    dls = [orjson.loads(v) for _, v in out.dead_letters]
    assert [(d["position"], d["reason"]) for d in dls] == [(1, "invalid_json"), (2, "non_finite_number"), (3, "invalid_json")]
    from worker.codec import original_payload

    assert [original_payload(d) for d in dls] == values[1:4]
    reg = e.telemetry.registry
    assert reg.get_sample_value("worker_records_total", {"outcome": "dead_letter"}) == 3
    assert reg.get_sample_value("worker_dead_letters_total", {"reason": "invalid_json"}) == 2
    assert reg.get_sample_value("worker_records_total", {"outcome": "learned"}) == 2
    assert shard.state.position == 5


def test_a_record_the_model_cannot_take_is_a_model_error_dead_letter():
    """A classifier whose fixed classes do not include the label: the step raises; the shard goes on."""
    e = engine(model={"pipeline": [{"compat.SKL2RiverClassifier": {
        "estimator": {"sklearn.linear_model.SGDClassifier": {"loss": "log_loss", "random_state": 0}}, "classes": [0, 1]}}]})
    shard = e.shard("s0")
    out = shard.process([b'{"x": {"a": 1.0}, "y": 0}', b'{"x": {"a": 1.0}, "y": 7}', b'{"x": {"a": 2.0}, "y": 1}'], [0, 1, 2], now=0.0)
    dls = [orjson.loads(v) for _, v in out.dead_letters]
    assert [d["reason"] for d in dls] == ["model_error"] and dls[0]["position"] == 1
    assert [p["position"] for p in preds(out)] == [0, 2]


def test_unlabelled_records_are_predicted_only():
    e = engine()
    shard = e.shard("s0")
    shard.process(lines(10, label=False), list(range(10)), now=0.0)
    reg = e.telemetry.registry
    assert reg.get_sample_value("worker_records_total", {"outcome": "predicted"}) == 10
    assert reg.get_sample_value("worker_records_total", {"outcome": "learned"}) == 0
    assert shard.state.quality.n == 0
    fresh = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    assert shard.state.model.predict_proba_one({"a": 3.0, "b": 1.0}) == fresh.predict_proba_one({"a": 3.0, "b": 1.0})


def test_filtered_records_are_counted_not_published():
    e = engine(record={"drop_if": [{"field": "x.a", "op": "eq", "value": 0.0}]})
    shard = e.shard("s0")
    out = shard.process(lines(14), list(range(14)), now=0.0)
    assert len(out.predictions) == 12 and not out.dead_letters
    assert e.telemetry.registry.get_sample_value("worker_records_total", {"outcome": "filtered"}) == 2


def test_positions_below_the_state_are_skipped_and_replay_publishes_nothing():
    """Restart semantics: below state.position = already learned; below publish_from = learn, don't publish."""
    data = lines(30)
    want = preds(engine().shard("s").process(data, list(range(30)), now=0.0))

    e = engine()
    first = e.shard("s")
    first.process(data[:10], list(range(10)), now=0.0)
    # the "crash" loses outputs of 10..19 but the model learned up to 10: replay 10..19 silently
    out = first.process(data[5:20], list(range(5, 20)), now=0.0, publish_from=20)
    assert out.predictions == [] and out.metrics == []
    out = first.process(data[20:], list(range(20, 30)), now=0.0, publish_from=20)
    assert preds(out) == want[20:]
    assert first.state.position == 30
    assert e.telemetry.registry.get_sample_value("worker_records_total", {"outcome": "replayed"}) == 10


def test_batches_do_not_change_results():
    data = lines(50)
    one = preds(engine().shard("s").process(data, list(range(50)), now=0.0))
    shard = engine().shard("s")
    many = []
    for i in range(0, 50, 7):
        many += preds(shard.process(data[i:i + 7], list(range(i, min(i + 7, 50))), now=0.0))
    assert many == one


def test_metrics_are_reported_every_n_records():
    shard = engine(monitor={"every_records": 20, "every_seconds": 1e9, "window": 10}).shard("s0")
    reports = []
    for i in range(0, 60, 10):
        out = shard.process(lines(10, i), list(range(i, i + 10)), now=float(i))
        reports += [orjson.loads(v) for _, v in out.metrics]
    assert [r["position"] for r in reports] == [20, 40, 60]
    r = reports[-1]
    assert r["event"] == "metrics" and r["shard"] == "s0" and r["records"] == 60
    assert r["cumulative"]["n"] == 60 and r["rolling"]["n"] == 10
    assert set(r["cumulative"]) >= {"accuracy", "f1", "log_loss"}


def test_drift_events_are_published_on_an_abrupt_change():
    shard = engine(monitor={"drift": concept_drift({"drift.ADWIN": {"delta": 0.002}})},
                   model={"pipeline": [{"naive_bayes.GaussianNB": {}}]}).shard("s0")
    recs = [orjson.dumps({"id": i, "x": {"a": float(i % 2)}, "y": (i % 2 == 0) != (i >= 1500)}) for i in range(3000)]
    drift = []
    for i in range(0, 3000, 500):
        out = shard.process(recs[i:i + 500], list(range(i, i + 500)), now=0.0)
        drift += [e for e in map(orjson.loads, (v for _, v in out.drift)) if e.get("signal") == "concept"]
    assert drift, "no drift event after the label flip"
    ev = drift[0]
    assert ev["event"] == "drift" and ev["signal"] == "concept" and ev["detector"] == "ADWIN"
    assert ev["direction"] == "degradation" and ev["shard"] == "s0"
    assert 1500 <= ev["position"] < 1700 and ev["record_id"] == ev["position"]


def test_make_step_matches_river_verbs():
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    ref = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    step = make_step(model, "classification")
    for i in range(20):
        x, y = {"a": float(i)}, i % 3 == 0
        p, proba = step(x, y)
        assert (p, proba) == (ref.predict_one(x), ref.predict_proba_one(x))
        ref.learn_one(x, y)


def test_concept_events_name_the_record_that_raised_them_among_unlabelled_ones():
    """The alert policy's error stream skips records without a target; each event names the
    record at which a detector fed one record at a time raises it."""
    from worker.monitoring.drift import ConceptDrift

    spec = {"drift.ADWIN": {"delta": 0.002}}
    shard = engine(monitor={"drift": concept_drift(spec)}, model={"pipeline": [{"naive_bayes.GaussianNB": {}}]}).shard("s0")
    labels = {i: (i % 2 == 0) != (i >= 1500 and i < 2600) for i in range(4000) if i % 3}  # every third has none
    recs = [orjson.dumps({"id": f"r{i}", "x": {"a": float(i % 2)}, **({"y": labels[i]} if i in labels else {})})
            for i in range(4000)]
    events, predictions = [], []
    for i in range(0, 4000, 500):
        out = shard.process(recs[i:i + 500], list(range(i, i + 500)), now=0.0)
        events += [e for e in map(orjson.loads, (v for _, v in out.drift)) if e.get("signal") == "concept"]
        predictions += [orjson.loads(v) for _, v in out.predictions]
    reference = ConceptDrift(spec)
    expected = [(p["id"], p["position"]) for p in predictions
                if p["position"] in labels and reference.observe(labels[p["position"]], p["prediction"], False)]
    assert expected, "the label flip raised no alarm"
    assert [(e["record_id"], e["position"]) for e in events] == expected


def test_a_label_of_another_kind_than_the_shards_first_is_an_invalid_target():
    """One string among boolean labels would make a tree refuse every later record (it compares classes)."""
    from worker.state import dumps_snapshot, loads_snapshot

    eng = engine(model={"pipeline": [{"tree.HoeffdingTreeClassifier": {}}]})
    shard = eng.shard("s")
    batch = lines(30)
    batch[5] = b'{"id": 5, "x": {"a": 1.0, "b": 2.0}, "y": "cat"}'
    out = shard.process(batch, list(range(30)), now=0.0)
    (dead,) = [orjson.loads(v) for _, v in out.dead_letters]
    assert (dead["reason"], dead["position"]) == ("invalid_target", 5) and "'cat' is a string" in dead["detail"]
    assert len(out.predictions) == 29 and shard.state.label_kind == "number"
    # the kind survives a snapshot: a string label later is refused the same way
    restored = eng.shard("s", loads_snapshot(dumps_snapshot(shard.state, eng.spec), eng.spec))
    out = restored.process([b'{"id": 30, "x": {"a": 1.0}, "y": "dog"}', b'{"id": 31, "x": {"a": 1.0}, "y": 1}'], [30, 31])
    assert [orjson.loads(v)["reason"] for _, v in out.dead_letters] == ["invalid_target"] and len(out.predictions) == 1
    strings = eng.shard("t")  # strings first: then a number is the odd one
    out = strings.process([b'{"x": {"a": 1.0}, "y": "yes"}', b'{"x": {"a": 1.0}, "y": 0}'], [0, 1])
    assert [orjson.loads(v)["detail"] for _, v in out.dead_letters] == [
        "the label 0 is a number; this shard's labels are strings (the first label decides)"]
