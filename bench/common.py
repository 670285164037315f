"""Shared pieces of the benchmarks: the data, the plain river loop, timing and reporting."""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from river import datasets

from worker.config import ModelSettings
from worker.models import build_model, calls

#: The reference model of the speed goals: StandardScaler | LogisticRegression on Agrawal.
REFERENCE_PIPELINE = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]

#: The model families of the core issue, as worker pipeline specs (ARF seeded).
FAMILIES = {
    "StandardScaler|LogisticRegression": REFERENCE_PIPELINE,
    "HoeffdingTreeClassifier": [{"tree.HoeffdingTreeClassifier": {}}],
    "GaussianNB": [{"naive_bayes.GaussianNB": {}}],
    "KNNClassifier": [{"neighbors.KNNClassifier": {}}],
    "ARFClassifier": [{"forest.ARFClassifier": {"seed": 42}}],
}


#: ``cpu_affinity`` of the single-worker throughput rows (Kafka, file): the benchmark machine is
#: the worker's own, where docs/operations.md advises ``split`` (the learner process on a CPU
#: of its own). The scaling rows keep the default (``auto``: no pinning on a machine whose
#: every CPU the worker may use): two workers on one host must not both pin.
WORKER_AFFINITY = "split"


#: Every process of a benchmark run gets this string-hash seed. The seed alone moves a river
#: loop by about 5 % here (it changes how the feature dicts collide), and the worker's
#: learner is another process: without one seed for all, a ratio would measure hash luck.
HASH_SEED = "0"


def pin_hash_seed(module: str) -> None:
    """Re-run ``python -m module`` with ``PYTHONHASHSEED`` set, unless it already is (then no-op)."""
    if os.environ.get("PYTHONHASHSEED"):
        return
    os.environ["PYTHONHASHSEED"] = HASH_SEED
    os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


def agrawal(n: int, seed: int = 42) -> list[tuple[dict, int]]:
    """``n`` pre-decoded records (features, label) of river's Agrawal generator."""
    return [(x, int(y)) for x, y in itertools.islice(datasets.synth.Agrawal(seed=seed), n)]


def write_jsonl(records: list[tuple[dict, int]], path: Path) -> Path:
    """The same records as the worker reads them: ``{"id", "x", "y"}`` per line."""
    with open(path, "wb") as f:
        for i, (x, y) in enumerate(records):
            f.write(orjson.dumps({"id": i, "x": x, "y": y}) + b"\n")
    return path


def plain_loop(records: list[tuple[dict, int]], pipeline: list[dict] = REFERENCE_PIPELINE, task: str = "classification",
               model: Any = None, direct: bool = False) -> float:
    """The ceiling: ``predict_one`` then ``learn_one`` over pre-decoded records (``score_one``
    then ``learn_one(x)`` for anomaly detection, ``learn_one(x)`` for clustering). Returns seconds.
    ``model``: learn this one (built from ``pipeline`` and ``task``) instead of a fresh one.
    ``direct``: call a simple pipeline's steps directly, as the worker's learner does
    (:func:`worker.models.calls`), instead of the pipeline's own methods."""
    if model is None:
        model = build_model(ModelSettings(task=task, pipeline=pipeline))
    if direct and task in ("classification", "regression"):
        c = calls(model)
        predict, learn = c.predict_one, c.learn_one
        started = time.perf_counter()
        for x, y in records:
            predict(x)
            learn(x, y)
        return time.perf_counter() - started
    learn = model.learn_one
    if task in ("anomaly", "clustering"):
        predict = model.score_one if task == "anomaly" else model.predict_one
        started = time.perf_counter()
        for x, _ in records:
            predict(x)
            learn(x)
        return time.perf_counter() - started
    predict = model.predict_one
    started = time.perf_counter()
    for x, y in records:
        predict(x)
        learn(x, y)
    return time.perf_counter() - started


def repeat(fn: Callable[[], float], times: int) -> list[float]:
    return [fn() for _ in range(times)]


def summary(ratios: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }
