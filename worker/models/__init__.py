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
from typing import Any

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
