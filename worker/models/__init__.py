"""Model specs -> river estimators, checked against the configured task.

>>> from worker.config import ModelSettings
>>> m = build_model(ModelSettings(task="regression", pipeline=[
...     {"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}]))
>>> type(m).__name__, [type(s).__name__ for s in m.steps.values()]
('Pipeline', ['StandardScaler', 'LinearRegression'])
>>> build_model(ModelSettings(task="regression", pipeline=[{"naive_bayes.GaussianNB": {}}]))
Traceback (most recent call last):
...
worker.errors.ModelSpecError: model.pipeline: the last step, GaussianNB, is not a regressor (model.task is regression)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
from river import base, compose, utils

from worker.config import ModelSettings
from worker.errors import ModelSpecError
from worker.models.spec import build_estimator, build_grid, build_value, resolve_class
from worker.models.spec import compose as compose_steps

_TASK_BASES = {
    "classification": (base.Classifier, "classifier"),
    "regression": (base.Regressor, "regressor"),
    "clustering": (base.Clusterer, "clusterer"),
    "anomaly": (base.AnomalyDetector, "anomaly detector"),
}


def final_step(model: base.Estimator) -> base.Estimator:
    """The estimator at the end of a pipeline (the model itself otherwise)."""
    if isinstance(model, compose.Pipeline):
        return list(model.steps.values())[-1]
    return model


class Calls(NamedTuple):
    """The per-record methods the learner calls (see :func:`calls`)."""

    predict_one: Callable[[dict], Any] | None  #: (None for an anomaly detector)
    predict_proba_one: Callable[[dict], dict] | None
    learn_one: Callable[[dict, Any], Any]


def calls(model: base.Estimator) -> Calls:
    """``predict_one``, ``predict_proba_one`` and ``learn_one`` of ``model``; for a pipeline of
    unsupervised transformers ending in a classifier or regressor, they call its steps directly.

    They do what the pipeline's own methods do for such a pipeline (river 0.26): to predict,
    each transformer transforms the record with its state before it; to learn, each one learns
    the record, then transforms it for the next, and the last step learns the result. What
    they leave out is the pipeline's general dispatch (routing extra arguments, unions,
    anomaly filters, supervised transformers, learning during prediction): about 1.4 µs per
    record for StandardScaler | LogisticRegression, 12 % of its time. Any other model gets
    its own methods. ``tests/unit/test_models.py`` checks that both give the same predictions,
    record after record while learning and on further records after.

    >>> m = build_model(ModelSettings(task="regression", pipeline=[
    ...     {"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}]))
    >>> c = calls(m)
    >>> for i in range(5):
    ...     c.learn_one({"a": float(i)}, 2.0 * i)
    >>> c.predict_one({"a": 3.0}) == m.predict_one({"a": 3.0})
    True
    """
    own = Calls(getattr(model, "predict_one", None), getattr(model, "predict_proba_one", None), model.learn_one)
    if not isinstance(model, compose.Pipeline) or compose.Pipeline._LEARN_UNSUPERVISED_DURING_PREDICT:
        return own
    *head, last = model.steps.values()
    simple = all(isinstance(t, base.Transformer) and not isinstance(t, (compose.TransformerUnion, base.AnomalyFilter))
                 and not t._supervised for t in head)
    if not head or not simple or isinstance(last, (base.Transformer, base.AnomalyFilter)) or not last._supervised:
        return own
    final_predict, final_learn = last.predict_one, last.learn_one
    final_proba = getattr(last, "predict_proba_one", None)
    if len(head) == 1:  # the usual case, without a loop
        transform, learn_first = head[0].transform_one, head[0].learn_one

        def predict_one(x: dict) -> Any:
            return final_predict(transform(x))

        def predict_proba_one(x: dict) -> dict:
            return final_proba(transform(x))

        def learn_one(x: dict, y: Any) -> None:
            learn_first(x)
            final_learn(transform(x), y)

    else:
        transforms = [t.transform_one for t in head]
        steps = [(t.learn_one, t.transform_one) for t in head]

        def _transformed(x: dict) -> dict:
            for transform in transforms:
                x = transform(x)
            return x

        def predict_one(x: dict) -> Any:
            return final_predict(_transformed(x))

        def predict_proba_one(x: dict) -> dict:
            return final_proba(_transformed(x))

        def learn_one(x: dict, y: Any) -> None:
            for learn, transform in steps:
                learn(x)
                x = transform(x)
            final_learn(x, y)

    return Calls(predict_one, predict_proba_one if final_proba is not None else None, learn_one)


def uses_imputer(model: base.Estimator) -> bool:
    """Whether a pipeline contains an imputer that expects ``None`` for missing values."""
    steps = model.steps.values() if isinstance(model, compose.Pipeline) else [model]
    return any("Imputer" in type(s).__name__ for s in steps)


def build_model(settings: ModelSettings) -> base.Estimator:
    """A fresh, untrained model from the spec (call again for an identical fresh copy)."""
    steps = [
        build_estimator(step, key=f"model.pipeline[{i}]") for i, step in enumerate(settings.pipeline)
    ]
    model = compose_steps(steps)
    if settings.selection is not None:
        sel = settings.selection
        cls_key = "model.selection.strategy"
        cls = resolve_class(sel.strategy, key=cls_key)
        grid = build_grid(sel.grid, "model.selection.grid")
        try:
            candidates = utils.expand_param_grid(model, grid)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelSpecError("model.selection.grid", f"cannot expand the grid: {exc!r}") from None
        if len(candidates) < 2:
            raise ModelSpecError("model.selection.grid", "the grid must give at least two candidates")
        params = build_value(dict(sel.params), "model.selection.params", False)
        try:
            model = cls(models=candidates, **params)
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(cls_key, f"cannot build {sel.strategy}: {exc}") from None
    expected, noun = _TASK_BASES[settings.task]
    last = final_step(model)
    if not isinstance(last, expected):
        raise ModelSpecError(
            "model.pipeline",
            f"the last step, {type(last).__name__}, is not a {noun} (model.task is {settings.task})",
        )
    return model


def spec_hash(settings: ModelSettings) -> str:
    """A stable hash of what defines the model: a snapshot of another spec is refused."""
    data = settings.model_dump(mode="json", include={"task", "pipeline", "selection"})
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def check_mini_batch(settings: Any, model: base.Estimator) -> None:
    """``model.mini_batch`` needs a model with the *_many methods and per-batch-only policies."""
    steps = model.steps.values() if isinstance(model, compose.Pipeline) else [model]
    task = settings.model.task
    if task not in ("classification", "regression"):
        raise ModelSpecError("model.mini_batch", f"mini-batches are for classification and regression, not {task}")
    last = final_step(model)
    predict = "predict_proba_many" if task == "classification" and settings.model.proba else "predict_many"
    missing = [type(s).__name__ for s in steps if not hasattr(s, "learn_many")]
    if not hasattr(last, predict):
        missing.append(f"{type(last).__name__}.{predict}")
    if missing:
        raise ModelSpecError("model.mini_batch", f"these steps cannot learn in mini-batches: {', '.join(missing)}")
    drift = settings.monitor.drift
    if drift.concept.policy != "alert" or drift.data.policy != "alert":
        raise ModelSpecError(
            "model.mini_batch", "mini-batches act per batch: use the alert policy for concept and data drift"
        )
