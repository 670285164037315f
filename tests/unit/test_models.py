"""worker.models: the estimator allowlist, spec forms, task checks, model selection, spec hash."""

from __future__ import annotations

import pytest
from river import compose, linear_model, model_selection, neighbors, optim, preprocessing, utils

from worker.config import ModelSettings
from worker.errors import ModelSpecError
from worker.models import build_model, final_step, spec_hash, uses_imputer
from worker.models.spec import DISTANCES, build_estimator, resolve_class

# -- the allowlist ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"os.system": "echo pwned"}, "only classes under the river package"),
        ({"builtins.eval": "1+1"}, "only classes under the river package"),
        ({"river.utils.math.minkowski_distance": {}}, "only classes under the river package"),
        ({"utils.math.minkowski_distance": {}}, "only classes under the river package"),
        ({"subprocess.Popen": ["ls"]}, "no such class"),  # looked up under river: river.subprocess
        ({"river.compat.BaseEstimator": {}}, "no such class|not a river class"),  # re-exports refused
        ({"linear_model.Nope": {}}, "no such class"),
        ({"sklearn.linear_model.SGDClassifier": {}}, "only allowed inside a compat"),
        ({"linear_model.LogisticRegression": {"optimizer": {"sklearn.linear_model.SGDClassifier": {}}}}, "only allowed inside a compat"),
        ({"compat.SKL2RiverClassifier": {"estimator": {"sklearn.utils.Bunch": {}}, "classes": [0, 1]}}, "not a scikit-learn estimator"),
        ("linear_model.LogisticRegression", "one-key mapping"),
        ({"a.B": {}, "c.D": {}}, "one-key mapping"),
    ],
)
def test_only_river_classes_and_sklearn_inside_compat(spec, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        build_estimator(spec)


def test_resolved_classes_are_river_classes():
    assert resolve_class("linear_model.LogisticRegression") is linear_model.LogisticRegression
    assert resolve_class("river.linear_model.LogisticRegression") is linear_model.LogisticRegression
    with pytest.raises(ModelSpecError):
        resolve_class("sklearn.neural_network.MLPClassifier")
    from sklearn.neural_network import MLPClassifier

    assert resolve_class("sklearn.neural_network.MLPClassifier", allow_sklearn=True) is MLPClassifier


def test_a_non_class_name_in_a_parameter_is_data_never_imported():
    """``{os.system: x}`` as a parameter does not look like a spec (no Class): it stays a plain dict."""
    m = build_estimator({"compat.SKL2RiverClassifier": {"estimator": {"os.system": "x"}, "classes": [0, 1]}})
    assert m.estimator == {"os.system": "x"}


def test_sklearn_estimator_inside_compat_wrapper():
    m = build_estimator({"compat.SKL2RiverClassifier": {
        "estimator": {"sklearn.neural_network.MLPClassifier": {"hidden_layer_sizes": [4], "random_state": 0}},
        "classes": [0, 1]}})
    assert type(m).__name__ == "SKL2RiverClassifier"
    assert m.estimator.random_state == 0 and list(m.estimator.hidden_layer_sizes) == [4]


# -- spec forms ------------------------------------------------------------------------------------


def test_nested_specs_are_built_recursively():
    m = build_estimator({"linear_model.LogisticRegression": {
        "optimizer": {"optim.Adam": {"lr": {"optim.schedulers.InverseScaling": {"learning_rate": 0.1}}}},
        "l2": 0.01}})
    assert isinstance(m.optimizer, optim.Adam)
    assert isinstance(m.optimizer.lr, optim.schedulers.InverseScaling)
    assert m.optimizer.lr.learning_rate == 0.1
    assert m.l2 == 0.01


def test_positional_args_as_list_and_single_value():
    sel = build_estimator({"compose.Select": ["a", "b"]})
    assert isinstance(sel, compose.Select) and set(sel.keys) == {"a", "b"}
    single = build_estimator({"compose.Discard": "noise"})
    assert set(single.keys) == {"noise"}
    empty = build_estimator({"preprocessing.StandardScaler": None})
    assert isinstance(empty, preprocessing.StandardScaler)


def test_spec_params_may_be_a_spec_itself_as_single_positional():
    bag = build_estimator({"ensemble.BaggingClassifier": {"model": {"linear_model.LogisticRegression": {}}, "seed": 1}})
    assert isinstance(bag.model, linear_model.LogisticRegression)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_dist_func_by_name(name):
    eng = build_estimator({"neighbors.LazySearch": {"window_size": 10, "dist_func": name}})
    assert isinstance(eng, neighbors.LazySearch)
    assert eng.dist_func({"a": 0.0, "b": 0.0}, {"a": 3.0, "b": 4.0}) == (5.0 if name == "euclidean" else 7.0)


def test_unknown_dist_func_names_the_key():
    with pytest.raises(ModelSpecError) as e:
        build_estimator({"neighbors.LazySearch": {"dist_func": "cosine"}}, key="model.pipeline[0]")
    assert e.value.key == "model.pipeline[0].neighbors.LazySearch.dist_func"


@pytest.mark.parametrize(
    "spec",
    [
        {"linear_model.LogisticRegression": {"l1": 0.1, "l2": 0.1}},  # river raises NotImplementedError
        {"linear_model.LogisticRegression": {"no_such_param": 1}},
        {"preprocessing.StatImputer": [1]},
    ],
)
def test_constructor_errors_become_model_spec_errors(spec):
    with pytest.raises(ModelSpecError):
        build_estimator(spec)


def test_non_composable_step_is_a_model_spec_error():
    with pytest.raises(ModelSpecError) as e:
        build_model(ModelSettings(pipeline=[{"preprocessing.StandardScaler": {}}, {"optim.SGD": {}}]))
    assert e.value.key.startswith("model.pipeline")


# -- tasks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "pipeline", "ok"),
    [
        ("classification", [{"linear_model.LogisticRegression": {}}], True),
        ("classification", [{"linear_model.LinearRegression": {}}], False),
        ("regression", [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}], True),
        ("regression", [{"naive_bayes.GaussianNB": {}}], False),
        ("clustering", [{"cluster.KMeans": {}}], True),
        ("clustering", [{"anomaly.HalfSpaceTrees": {}}], False),
        ("anomaly", [{"preprocessing.MinMaxScaler": {}}, {"anomaly.HalfSpaceTrees": {}}], True),
        ("anomaly", [{"preprocessing.StandardScaler": {}}], False),
    ],
)
def test_task_mismatch(task, pipeline, ok):
    settings = ModelSettings(task=task, pipeline=pipeline)
    if ok:
        build_model(settings)
    else:
        with pytest.raises(ModelSpecError) as e:
            build_model(settings)
        assert e.value.key == "model.pipeline" and task in str(e.value)


def test_build_model_gives_fresh_independent_copies():
    s = ModelSettings(pipeline=[{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}])
    a, b = build_model(s), build_model(s)
    a.learn_one({"f": 1.0}, True)
    assert a is not b and b.predict_proba_one({"f": 1.0}) == {False: 0.5, True: 0.5}


def test_final_step_and_imputer_detection():
    m = build_model(ModelSettings(pipeline=[{"preprocessing.StatImputer": []}, {"linear_model.LogisticRegression": {}}]))
    assert isinstance(final_step(m), linear_model.LogisticRegression)
    assert uses_imputer(m)
    assert not uses_imputer(build_model(ModelSettings()))


# -- model selection ---------------------------------------------------------------------------------

BASE = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
LR_GRID = {"LogisticRegression": {"optimizer": {"optim.SGD": {"lr": [0.01, 0.1, 0.5]}}}}


@pytest.mark.parametrize(
    ("task", "pipeline", "strategy", "params", "cls"),
    [
        ("classification", BASE, "model_selection.SuccessiveHalvingClassifier",
         {"metric": {"metrics.Accuracy": {}}, "budget": 100}, model_selection.SuccessiveHalvingClassifier),
        ("classification", BASE, "model_selection.BanditClassifier",
         {"metric": {"metrics.Accuracy": {}}, "policy": {"bandit.EpsilonGreedy": {"epsilon": 0.1, "seed": 1}}},
         model_selection.BanditClassifier),
        ("regression", [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}],
         "model_selection.GreedyRegressor", {"metric": {"metrics.MAE": {}}}, model_selection.GreedyRegressor),
    ],
)
def test_model_selection_over_an_expanded_grid(task, pipeline, strategy, params, cls):
    grid = {next(reversed(pipeline[-1])).split(".")[-1]: {"optimizer": {"optim.SGD": {"lr": [0.01, 0.1, 0.5]}}}}
    m = build_model(ModelSettings(task=task, pipeline=pipeline,
                                  selection={"strategy": strategy, "params": params, "grid": grid}))
    assert isinstance(m, cls)
    lrs = sorted(list(c.steps.values())[-1].optimizer.lr.learning_rate for c in m.models)
    assert lrs == [0.01, 0.1, 0.5]
    # the same candidates as river's own expand_param_grid
    last = list(m.models[0].steps.values())[-1]
    reference = utils.expand_param_grid(
        preprocessing.StandardScaler() | type(last)(),
        {type(last).__name__: {"optimizer": (optim.SGD, {"lr": [0.01, 0.1, 0.5]})}},
    )
    assert [repr(c) for c in m.models] == [repr(c) for c in reference]


def test_grid_of_plain_values():
    m = build_model(ModelSettings(pipeline=BASE, selection={
        "strategy": "model_selection.GreedyClassifier" if hasattr(model_selection, "GreedyClassifier") else "model_selection.BanditClassifier",
        "params": {} if hasattr(model_selection, "GreedyClassifier") else {"metric": {"metrics.Accuracy": {}}, "policy": {"bandit.UCB": {"delta": 1}}},
        "grid": {"LogisticRegression": {"l2": [0.0, 0.01], "intercept_lr": [0.01, 0.1]}}}))
    assert len(m.models) == 4


@pytest.mark.parametrize(
    ("selection", "key"),
    [
        ({"strategy": "model_selection.BanditClassifier", "grid": {"LogisticRegression": {"l2": [0.1]}},
          "params": {"metric": {"metrics.Accuracy": {}}, "policy": {"bandit.UCB": {"delta": 1}}}}, "model.selection.grid"),
        ({"strategy": "model_selection.Nope", "grid": LR_GRID}, "model.selection.strategy"),
        ({"strategy": "os.system", "grid": LR_GRID}, "model.selection.strategy"),
        ({"strategy": "model_selection.BanditClassifier", "grid": LR_GRID}, "model.selection.strategy"),  # no metric/policy
        ({"strategy": "model_selection.BanditClassifier", "grid": {"LogisticRegression": {"l2": 0.1}}},
         "model.selection.grid.LogisticRegression.l2"),
    ],
)
def test_bad_selection_names_its_key(selection, key):
    with pytest.raises(ModelSpecError) as e:
        build_model(ModelSettings(pipeline=BASE, selection=selection))
    assert e.value.key == key


# -- spec hash ---------------------------------------------------------------------------------------


def test_spec_hash_is_stable_and_depends_only_on_the_model():
    a = ModelSettings(pipeline=[{"linear_model.LogisticRegression": {"l2": 0.1, "intercept_lr": 0.1}}])
    b = ModelSettings(pipeline=[{"linear_model.LogisticRegression": {"intercept_lr": 0.1, "l2": 0.1}}])
    assert spec_hash(a) == spec_hash(b)  # key order does not matter
    assert spec_hash(a) == spec_hash(ModelSettings.model_validate(a.model_dump()))
    assert spec_hash(a) == spec_hash(a.model_copy(update={"proba": False, "anomaly_threshold": 0.3}))
    c = ModelSettings(pipeline=[{"linear_model.LogisticRegression": {"l2": 0.2, "intercept_lr": 0.1}}])
    assert spec_hash(a) != spec_hash(c)
    assert spec_hash(a) != spec_hash(a.model_copy(update={"task": "regression"}))
    assert len(spec_hash(a)) == 16 and int(spec_hash(a), 16) >= 0


def test_spec_hash_is_the_same_across_processes():
    import subprocess
    import sys

    code = ("from worker.config import ModelSettings; from worker.models import spec_hash; "
            "print(spec_hash(ModelSettings(pipeline=[{'linear_model.LogisticRegression': {'l2': 0.1}}])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == spec_hash(ModelSettings(pipeline=[{"linear_model.LogisticRegression": {"l2": 0.1}}]))


@pytest.mark.parametrize(
    ("task", "pipeline", "direct"),
    [
        ("classification", [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}], True),
        ("classification", [{"preprocessing.StandardScaler": {}}, {"preprocessing.MinMaxScaler": {}},
                            {"naive_bayes.GaussianNB": {}}], True),
        ("classification", [{"preprocessing.StandardScaler": {}}, {"tree.HoeffdingTreeClassifier": {}}], True),
        ("regression", [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}], True),
        ("classification", [{"linear_model.LogisticRegression": {}}], False),  # not a pipeline: its own methods
        ("classification", [{"preprocessing.StandardScaler": {}}, {"feature_extraction.TargetAgg": {"by": "elevel", "how": {"stats.Mean": {}}}},
                            {"linear_model.LogisticRegression": {}}], False),  # a supervised transformer
    ],
)
def test_the_direct_calls_predict_and_learn_as_the_pipeline_does(task, pipeline, direct):
    """:func:`worker.models.calls` on a model, the model's own methods on an identical copy:
    the same predictions record after record, and on more records after that."""
    import itertools

    from river import datasets

    from worker.models import calls

    stream = datasets.synth.Agrawal(seed=3) if task == "classification" else datasets.synth.Friedman(seed=3)
    records = list(itertools.islice(stream, 2_000))
    ours, theirs = build_model(ModelSettings(task=task, pipeline=pipeline)), build_model(ModelSettings(task=task, pipeline=pipeline))
    c = calls(ours)
    assert (c.learn_one != ours.learn_one) is direct  # the steps are called directly where they can be
    for x, y in records:
        if task == "classification":
            assert c.predict_proba_one(x) == theirs.predict_proba_one(x)
        assert c.predict_one(x) == theirs.predict_one(x)
        c.learn_one(x, y)
        theirs.learn_one(x, y)
    for x, _ in itertools.islice(stream, 300):  # and what they learned: the same predictions afterwards
        assert c.predict_one(x) == theirs.predict_one(x)
