"""End to end, per model family: the worker's predictions equal a plain river loop, exactly.

For each family, records from a real river dataset (bundled in the wheel: Phishing,
TrumpApproval, Bananas, ImageSegments, ChickWeights) or a seeded synthetic stream (Agrawal,
Friedman, SEA, ...) are encoded as JSON lines and run through
``worker.learning.Engine``/``Shard`` in several batches. The reference is a plain river
loop over the same records with a freshly built model, written here directly in Python
(not through the worker's spec parser):

- predictions: ``predict_one`` then ``learn_one`` (the loop the issue names);
- probabilities: ``predict_proba_one`` then ``learn_one``, in a second fresh model;
- anomaly: ``score_one`` then ``learn_one``; clustering: ``predict_one`` then ``learn_one(x)``.

Comparison is ``==`` on what would be published: the reference values go through the
worker's own JSON encoder (``worker.codec.dumps``) and back, so that class labels used as
``proba`` keys become strings exactly as in the worker's output. No tolerance anywhere.

The input records are themselves canonicalised through JSON before the reference sees them
(Friedman's integer feature names become "0".."9", as they would in any JSON stream).

Nearest neighbours: river 0.26.1's default engine (``SWINN`` with its Rust distance fast
path) sums distances in an order that changes from run to run, so two identical plain
loops already disagree on near-ties. The worker offers deterministic distances by name
(``dist_func: euclidean``), and these tests use ``neighbors.LazySearch`` with it, the only
way an exact comparison means anything.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest
from river import (
    anomaly,
    bandit,
    cluster,
    compat,
    compose,
    datasets,
    ensemble,
    forest,
    linear_model,
    metrics,
    model_selection,
    naive_bayes,
    neighbors,
    optim,
    preprocessing,
    stats,
    tree,
    utils,
)
from river.datasets import synth

from worker.codec import dumps
from worker.config import load_settings
from worker.learning import Engine

BATCH = 97  # a size that does not divide the data: batches of every shape


def canon(value: Any) -> Any:
    """What a value looks like after the worker's JSON encoding (orjson both ways)."""
    return orjson.loads(dumps(value))


def take(dataset: Iterable, n: int) -> list[tuple[dict, Any]]:
    return [(canon(x), canon(y)) for x, y in itertools.islice(dataset, n)]


# -- data ---------------------------------------------------------------------------------


def phishing(n: int = 600) -> list:
    return take(datasets.Phishing(), n)


def trump(n: int = 600) -> list:
    return take(datasets.TrumpApproval(), n)


def bananas(n: int = 600) -> list:
    return take(datasets.Bananas(), n)


def segment(n: int = 500) -> list:
    return take(datasets.ImageSegments(), n)


def agrawal(n: int = 600) -> list:
    return take(synth.Agrawal(classification_function=2, seed=42), n)


def friedman(n: int = 600) -> list:
    return take(synth.Friedman(seed=42), n)


def credit_card_like(n: int = 800) -> list:
    """CreditCard is not bundled with river (it is downloaded): a seeded imbalanced stand-in."""
    rng = random.Random(7)
    rows = []
    for _ in range(n):
        fraud = rng.random() < 0.05
        x = {f"V{i}": rng.gauss(2.0 if fraud and i < 3 else 0.0, 1.0) for i in range(8)}
        x["Amount"] = round(rng.expovariate(1 / (300 if fraud else 60)), 2)
        rows.append((x, fraud))
    return [(canon(x), y) for x, y in rows]


def with_gaps(n: int = 600) -> list:
    """Numeric features with nulls (for StatImputer), seeded."""
    rng = random.Random(3)
    rows = []
    for _ in range(n):
        a, b = rng.gauss(0, 1), rng.gauss(5, 2)
        y = a + 0.5 * b > 2.5
        x = {"a": a if rng.random() > 0.2 else None, "b": b if rng.random() > 0.2 else None, "c": rng.random()}
        rows.append((x, y))
    return [(canon(x), y) for x, y in rows]


def categorical(n: int = 600) -> list:
    """A string feature plus numeric ones, and a noise field to discard."""
    rng = random.Random(5)
    colours = ["red", "green", "blue", "black"]
    rows = []
    for _ in range(n):
        c = rng.choice(colours)
        a = rng.gauss(0, 1)
        y = (c in ("red", "blue")) != (a > 1.0)
        rows.append(({"colour": c, "a": a, "b": rng.uniform(0, 10), "noise": rng.random()}, y))
    return [(canon(x), y) for x, y in rows]


def counts(n: int = 600) -> list:
    """Word counts for MultinomialNB: non-negative integers, two topics."""
    rng = random.Random(11)
    words = ["ball", "goal", "team", "vote", "law", "party", "match", "court"]
    rows = []
    for _ in range(n):
        topic = rng.choice(["sport", "politics"])
        bias = words[:3] + ["match"] if topic == "sport" else words[3:6] + ["court"]
        x: dict[str, int] = {}
        for _ in range(rng.randint(3, 9)):
            w = rng.choice(bias) if rng.random() < 0.7 else rng.choice(words)
            x[w] = x.get(w, 0) + 1
        rows.append((x, topic))
    return rows


# -- the two loops --------------------------------------------------------------------------


def run_worker(task: str, pipeline: list, data: list, *, record: dict | None = None, **model: Any) -> list[dict]:
    settings = load_settings(
        data={
            "model": {"task": task, "pipeline": pipeline, **model},
            "record": record or {},
            "monitor": {"every_records": 250},
        },
        env={},
    )
    shard = Engine(settings).shard("families")
    lines = [orjson.dumps({"id": i, "x": x, "y": y}) for i, (x, y) in enumerate(data)]
    published: list[dict] = []
    for start in range(0, len(lines), BATCH):
        chunk = lines[start : start + BATCH]
        out = shard.process(chunk, list(range(start, start + len(chunk))), now=0.0)
        assert out.dead_letters == [], [orjson.loads(v)["detail"] for _, v in out.dead_letters[:3]]
        published.extend(orjson.loads(v) for _, v in out.predictions)
    assert [p["position"] for p in published] == list(range(len(data)))
    assert [p["id"] for p in published] == list(range(len(data)))
    return published


def plain_predictions(factory: Callable[[], Any], data: list, task: str) -> list:
    model = factory()
    preds = []
    for x, y in data:
        if task == "anomaly":
            preds.append(model.score_one(x))
            model.learn_one(x)
        elif task == "clustering":
            preds.append(model.predict_one(x))
            model.learn_one(x)
        else:
            preds.append(model.predict_one(x))
            model.learn_one(x, y)
    return [canon(p) for p in preds]


def plain_probas(factory: Callable[[], Any], data: list) -> list:
    model = factory()
    probas = []
    for x, y in data:
        probas.append(model.predict_proba_one(x))
        model.learn_one(x, y)
    return [canon(p) for p in probas]


def first_difference(got: list, want: list) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"first difference at record {i}: worker {g!r} != river {w!r}"
    return f"lengths differ: {len(got)} != {len(want)}"


def check_family(task: str, pipeline: list, factory: Callable[[], Any], data: list, **kw: Any) -> list[dict]:
    published = run_worker(task, pipeline, data, **kw)
    got = [p["prediction"] for p in published]
    if task == "anomaly":
        got = [p["score"] for p in published]
    want = plain_predictions(factory, data, task)
    assert got == want, first_difference(got, want)
    if task == "classification" and kw.get("proba", True):
        got_p = [p["proba"] for p in published]
        want_p = plain_probas(factory, data)
        assert got_p == want_p, first_difference(got_p, want_p)
    # a family that never changes its mind is not a test of anything
    if task != "anomaly":
        assert len({orjson.dumps(w) for w in want}) > 1, "degenerate reference: constant predictions"
    return published


euclidean = functools.partial(utils.math.minkowski_distance, p=2)

# (id, task, worker pipeline spec, plain river factory, data, extra model settings)
FAMILIES: list[tuple[str, str, list, Callable[[], Any], Callable[[], list], dict]] = [
    (
        "logistic-regression/phishing",
        "classification",
        [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {"optimizer": {"optim.SGD": {"lr": 0.05}}}}],
        lambda: preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.05)),
        phishing,
        {},
    ),
    (
        "linear-regression/trump-approval",
        "regression",
        [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {"intercept_lr": 0.1}}],
        lambda: preprocessing.StandardScaler() | linear_model.LinearRegression(intercept_lr=0.1),
        trump,
        {},
    ),
    (
        "pa-classifier/bananas",
        "classification",
        [{"linear_model.PAClassifier": {"C": 0.01, "mode": 1}}],
        lambda: linear_model.PAClassifier(C=0.01, mode=1),
        bananas,
        {},
    ),
    (
        "knn-classifier/phishing",
        "classification",
        [
            {"preprocessing.StandardScaler": {}},
            {"neighbors.KNNClassifier": {"n_neighbors": 5, "engine": {"neighbors.LazySearch": {"window_size": 50, "dist_func": "euclidean"}}}},
        ],
        lambda: preprocessing.StandardScaler()
        | neighbors.KNNClassifier(n_neighbors=5, engine=neighbors.LazySearch(window_size=50, dist_func=euclidean)),
        phishing,
        {},
    ),
    (
        "knn-regressor/trump-approval",
        "regression",
        [
            {"preprocessing.StandardScaler": {}},
            {"neighbors.KNNRegressor": {"n_neighbors": 3, "engine": {"neighbors.LazySearch": {"window_size": 50, "dist_func": "euclidean"}}}},
        ],
        lambda: preprocessing.StandardScaler()
        | neighbors.KNNRegressor(n_neighbors=3, engine=neighbors.LazySearch(window_size=50, dist_func=euclidean)),
        trump,
        {},
    ),
    (
        "hoeffding-tree-classifier/agrawal",
        "classification",
        [{"tree.HoeffdingTreeClassifier": {"grace_period": 50}}],
        lambda: tree.HoeffdingTreeClassifier(grace_period=50),
        agrawal,
        {},
    ),
    (
        "hoeffding-adaptive-tree-classifier/phishing",
        "classification",
        [{"tree.HoeffdingAdaptiveTreeClassifier": {"grace_period": 50, "seed": 1}}],
        lambda: tree.HoeffdingAdaptiveTreeClassifier(grace_period=50, seed=1),
        phishing,
        {},
    ),
    (
        "hoeffding-tree-regressor/friedman",
        "regression",
        [{"tree.HoeffdingTreeRegressor": {"grace_period": 50}}],
        lambda: tree.HoeffdingTreeRegressor(grace_period=50),
        friedman,
        {},
    ),
    (
        "hoeffding-adaptive-tree-regressor/trump-approval",
        "regression",
        [{"tree.HoeffdingAdaptiveTreeRegressor": {"grace_period": 50, "seed": 1}}],
        lambda: tree.HoeffdingAdaptiveTreeRegressor(grace_period=50, seed=1),
        trump,
        {},
    ),
    (
        "gaussian-nb/segment",
        "classification",
        [{"naive_bayes.GaussianNB": {}}],
        lambda: naive_bayes.GaussianNB(),
        segment,
        {},
    ),
    (
        "multinomial-nb/word-counts",
        "classification",
        [{"naive_bayes.MultinomialNB": {"alpha": 1}}],
        lambda: naive_bayes.MultinomialNB(alpha=1),
        counts,
        {},
    ),
    (
        "mlp-classifier/phishing",
        "classification",
        [
            {"preprocessing.StandardScaler": {}},
            {
                "compat.SKL2RiverClassifier": {
                    "estimator": {"sklearn.neural_network.MLPClassifier": {"hidden_layer_sizes": [8], "random_state": 0}},
                    "classes": [False, True],
                }
            },
        ],
        lambda: preprocessing.StandardScaler()
        | compat.SKL2RiverClassifier(
            __import__("sklearn.neural_network").neural_network.MLPClassifier(hidden_layer_sizes=[8], random_state=0),
            classes=[False, True],
        ),
        lambda: phishing(250),
        {},
    ),
    (
        "mlp-regressor/trump-approval",
        "regression",
        [
            {"preprocessing.StandardScaler": {}},
            {
                "compat.SKL2RiverRegressor": {
                    "estimator": {"sklearn.neural_network.MLPRegressor": {"hidden_layer_sizes": [8], "random_state": 0}}
                }
            },
        ],
        lambda: preprocessing.StandardScaler()
        | compat.SKL2RiverRegressor(
            __import__("sklearn.neural_network").neural_network.MLPRegressor(hidden_layer_sizes=[8], random_state=0)
        ),
        lambda: trump(250),
        {},
    ),
    (
        "kmeans/bananas",
        "clustering",
        [{"cluster.KMeans": {"n_clusters": 4, "halflife": 0.4, "seed": 3}}],
        lambda: cluster.KMeans(n_clusters=4, halflife=0.4, seed=3),
        bananas,
        {},
    ),
    (
        "half-space-trees/credit-card-like",
        "anomaly",
        [{"preprocessing.MinMaxScaler": {}}, {"anomaly.HalfSpaceTrees": {"n_trees": 5, "height": 6, "window_size": 50, "seed": 42}}],
        lambda: preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(n_trees=5, height=6, window_size=50, seed=42),
        credit_card_like,
        {},
    ),
    (
        "arf-classifier/agrawal",
        "classification",
        [{"forest.ARFClassifier": {"n_models": 3, "grace_period": 50, "seed": 8}}],
        lambda: forest.ARFClassifier(n_models=3, grace_period=50, seed=8),
        lambda: agrawal(400),
        {},
    ),
    (
        "bagging/phishing",
        "classification",
        [
            {"preprocessing.StandardScaler": {}},
            {"ensemble.BaggingClassifier": {"model": {"linear_model.LogisticRegression": {}}, "n_models": 3, "seed": 4}},
        ],
        lambda: preprocessing.StandardScaler()
        | ensemble.BaggingClassifier(linear_model.LogisticRegression(), n_models=3, seed=4),
        phishing,
        {},
    ),
    (
        "adaboost/credit-card-like",
        "classification",
        [{"ensemble.AdaBoostClassifier": {"model": {"tree.HoeffdingTreeClassifier": {"grace_period": 50}}, "n_models": 3, "seed": 4}}],
        lambda: ensemble.AdaBoostClassifier(tree.HoeffdingTreeClassifier(grace_period=50), n_models=3, seed=4),
        lambda: credit_card_like(500),
        {},
    ),
    (
        "stat-imputer/with-gaps",
        "classification",
        [
            {"preprocessing.StatImputer": [["a", {"stats.Mean": {}}], ["b", {"stats.Mean": {}}]]},
            {"preprocessing.StandardScaler": {}},
            {"linear_model.LogisticRegression": {}},
        ],
        lambda: preprocessing.StatImputer(("a", stats.Mean()), ("b", stats.Mean()))
        | preprocessing.StandardScaler()
        | linear_model.LogisticRegression(),
        with_gaps,
        {},
    ),
    (
        "minmax-scaler/bananas",
        "classification",
        [{"preprocessing.MinMaxScaler": {}}, {"naive_bayes.GaussianNB": {}}],
        lambda: preprocessing.MinMaxScaler() | naive_bayes.GaussianNB(),
        bananas,
        {},
    ),
    (
        "one-hot-select-discard/categorical",
        "classification",
        [
            {"compose.Discard": ["noise"]},
            {
                "compose.TransformerUnion": [
                    {"compose.Pipeline": [{"compose.Select": ["colour"]}, {"preprocessing.OneHotEncoder": {}}]},
                    {"compose.Pipeline": [{"compose.Select": ["a", "b"]}, {"preprocessing.StandardScaler": {}}]},
                ]
            },
            {"linear_model.LogisticRegression": {}},
        ],
        lambda: compose.Discard("noise")
        | (
            (compose.Select("colour") | preprocessing.OneHotEncoder())
            + (compose.Select("a", "b") | preprocessing.StandardScaler())
        )
        | linear_model.LogisticRegression(),
        categorical,
        {},
    ),
    (
        "bandit-selection/phishing",
        "classification",
        [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}],
        lambda: model_selection.BanditClassifier(
            utils.expand_param_grid(
                preprocessing.StandardScaler() | linear_model.LogisticRegression(),
                {"LogisticRegression": {"optimizer": (optim.SGD, {"lr": [0.001, 0.01, 0.1]})}},
            ),
            metric=metrics.Accuracy(),
            policy=bandit.EpsilonGreedy(epsilon=0.2, seed=5),
        ),
        phishing,
        {
            "selection": {
                "strategy": "model_selection.BanditClassifier",
                "params": {"metric": {"metrics.Accuracy": {}}, "policy": {"bandit.EpsilonGreedy": {"epsilon": 0.2, "seed": 5}}},
                "grid": {"LogisticRegression": {"optimizer": {"optim.SGD": {"lr": [0.001, 0.01, 0.1]}}}},
            }
        },
    ),
    (
        "successive-halving/phishing",
        "classification",
        [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}],
        lambda: model_selection.SuccessiveHalvingClassifier(
            utils.expand_param_grid(
                preprocessing.StandardScaler() | linear_model.LogisticRegression(),
                {"LogisticRegression": {"optimizer": (optim.SGD, {"lr": [0.001, 0.01, 0.1, 0.5]})}},
            ),
            metric=metrics.Accuracy(),
            budget=400,
        ),
        phishing,
        {
            "selection": {
                "strategy": "model_selection.SuccessiveHalvingClassifier",
                "params": {"metric": {"metrics.Accuracy": {}}, "budget": 400},
                "grid": {"LogisticRegression": {"optimizer": {"optim.SGD": {"lr": [0.001, 0.01, 0.1, 0.5]}}}},
            }
        },
    ),
    (
        "greedy-selection/chick-weights",
        "regression",
        [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}],
        lambda: model_selection.GreedyRegressor(
            utils.expand_param_grid(
                preprocessing.StandardScaler() | linear_model.LinearRegression(),
                {"LinearRegression": {"optimizer": (optim.SGD, {"lr": [0.001, 0.01, 0.05]})}},
            ),
            metric=metrics.MAE(),
        ),
        lambda: take(datasets.ChickWeights(), 578),
        {
            "selection": {
                "strategy": "model_selection.GreedyRegressor",
                "params": {"metric": {"metrics.MAE": {}}},
                "grid": {"LinearRegression": {"optimizer": {"optim.SGD": {"lr": [0.001, 0.01, 0.05]}}}},
            }
        },
    ),
]


@pytest.mark.parametrize(
    ("task", "pipeline", "factory", "data", "extra"),
    [pytest.param(*f[1:], id=f[0]) for f in FAMILIES],
)
def test_worker_equals_plain_river_loop(task, pipeline, factory, data, extra):
    check_family(task, pipeline, factory, data(), **extra)


def test_multiclass_labels_and_proba_keys_survive_json():
    """ImageSegments has 7 string classes: the published proba has one key per seen class."""
    data = segment(300)
    published = check_family("classification", [{"naive_bayes.GaussianNB": {}}], naive_bayes.GaussianNB, data)
    assert set(published[-1]["proba"]) == {y for _, y in data[:-1]}


def test_proba_off_publishes_predictions_only():
    data = phishing(300)
    pipeline = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
    factory = lambda: preprocessing.StandardScaler() | linear_model.LogisticRegression()  # noqa: E731
    published = check_family("classification", pipeline, factory, data, proba=False)
    assert all("proba" not in p for p in published)


def test_anomaly_threshold_turns_the_score_into_a_label():
    data = credit_card_like(400)
    pipeline = [{"preprocessing.MinMaxScaler": {}}, {"anomaly.HalfSpaceTrees": {"window_size": 50, "seed": 1}}]
    published = run_worker("anomaly", pipeline, data, anomaly_threshold=0.5)
    assert [p["prediction"] for p in published] == [p["score"] >= 0.5 for p in published]
    published_plain = run_worker("anomaly", pipeline, data)
    assert all(p["prediction"] is None for p in published_plain)


def test_unlabelled_records_are_predicted_not_learned():
    """Every third record has no target: the worker must predict it and not learn from it."""
    data = phishing(450)
    masked = [(x, None if i % 3 == 0 else y) for i, (x, y) in enumerate(data)]
    pipeline = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    want = []
    for x, y in masked:
        want.append(canon(model.predict_proba_one(x)))
        if y is not None:
            model.learn_one(x, y)
    published = run_worker("classification", pipeline, masked)
    got = [p["proba"] for p in published]
    assert got == want, first_difference(got, want)
