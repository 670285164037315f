"""model.mini_batch: groups predicted with the model as of the group's start, then learned at once."""

from __future__ import annotations

import itertools

import orjson
import pandas as pd
import pytest
from river import datasets, linear_model, preprocessing

from worker.config import load_settings
from worker.errors import ConfigError
from worker.learning import Engine


def records(n: int) -> list[tuple[dict, int]]:
    return [(x, int(y)) for x, y in itertools.islice(datasets.synth.Agrawal(seed=3), n)]


def test_mini_batch_equals_a_plain_many_loop():
    recs = records(3_000)
    lines = [orjson.dumps({"id": i, "x": x, "y": y}) for i, (x, y) in enumerate(recs)]
    settings = load_settings(data={"model": {"mini_batch": 250}, "limits": {"batch_size": 1000}}, env={})
    shard = Engine(settings).shard("s")
    got = []
    for start in range(0, len(lines), 1000):
        out = shard.process(lines[start : start + 1000], list(range(start, start + 1000)), now=0.0)
        got += [orjson.loads(v) for _, v in out.predictions]
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    expected = []
    for start in range(0, len(recs), 250):
        X = pd.DataFrame([x for x, _ in recs[start : start + 250]]).astype(float)  # the worker's frames are float64
        P = model.predict_proba_many(X)
        expected += [{str(k).lower(): v for k, v in row.items()} for row in P.to_dict("records")]
        model.learn_many(X, pd.Series([y for _, y in recs[start : start + 250]]))
    assert [g["proba"] for g in got] == expected
    assert len(got) == 3_000


@pytest.mark.parametrize(
    "xs",
    [
        [{"a": 1.0, "b": 2.0}, {"b": 2.0, "a": 1.0}],  # another key order
        [{"a": 1.0}, {"a": None}],
        [{"a": 1.0}, {"a": float("nan")}],
        [{"a": 1.0}, {"a": "1.5"}],  # a numeric string is not a number
        [{"a": 1.0}, {"a": [1.0]}],
    ],
)
def test_frames_only_from_aligned_numbers(xs):
    from worker.learner import _frame

    assert _frame(xs) is None
    frame = _frame([{"a": 1, "b": 2.5}, {"a": True, "b": 3}])
    assert frame.columns.tolist() == ["a", "b"] and frame.to_numpy().tolist() == [[1.0, 2.5], [1.0, 3.0]]


def test_mini_batch_falls_back_to_records_on_missing_values():
    lines = [orjson.dumps({"id": i, "x": {"a": 1.0} if i % 2 else {"a": 1.0, "b": 2.0}, "y": i % 2}) for i in range(40)]
    shard = Engine(load_settings(data={"model": {"mini_batch": 10}}, env={})).shard("s")
    out = shard.process(lines, list(range(40)), now=0.0)
    assert len(out.predictions) == 40 and not out.dead_letters


@pytest.mark.parametrize(
    "data",
    [
        {"model": {"mini_batch": 100, "pipeline": [{"tree.HoeffdingTreeClassifier": {}}]}},
        {"model": {"mini_batch": 100}, "monitor": {"drift": {"concept": {"policy": "challenger"}}}},
        {"model": {"mini_batch": 100, "task": "clustering", "pipeline": [{"cluster.KMeans": {}}]}},
    ],
)
def test_mini_batch_refuses_what_it_cannot_do_naming_the_key(data):
    with pytest.raises(ConfigError) as e:
        load_settings(data=data, env={})
    assert e.value.key == "model.mini_batch"


def _learner(mini_batch: int):
    from worker.learner import Learner, LearnerConfig
    from worker.state import ShardState

    config = LearnerConfig(load_settings(data={"model": {"mini_batch": mini_batch}}, env={}))
    return Learner(config, ShardState(shard="s", model=config.new_model()))


def test_a_group_that_is_no_frame_goes_record_by_record_and_each_record_is_learned_once():
    learner = _learner(3)
    xs = [{"a": 1.0}, {"a": 2.0}, {"a": 3.0}, {"a": 4.0}, {"a": "text"}, {"a": 6.0}]
    result = learner.learn(xs, [0, 1, 0, 1, 0, 1], list(range(6)), list(range(6)), None)
    scaler = learner.state.model.steps["StandardScaler"]
    assert scaler.counts["a"] == 5 and len(result.preds) == 6  # group 1 once, then 4.0 and 6.0 one by one
    assert set(result.errors) == {4}  # the scaler refuses the string, as record by record


def test_a_label_the_model_refuses_in_a_later_group_is_a_model_error_not_a_crash():
    learner = _learner(2)
    xs = [{"a": float(i)} for i in range(6)]
    result = learner.learn(xs, [0, 1, 0, 1, "cat", 1], list(range(6)), list(range(6)), None)
    assert len(result.preds) == 6 and set(result.errors) == {4}
    assert "TypeError" in result.errors[4] or "ValueError" in result.errors[4]
    more = learner.learn([{"a": 1.0}, {"a": 2.0}], [0, 1], [6, 7], [6, 7], None)  # and the shard goes on
    assert more.errors is None and len(more.preds) == 2
