"""Turn a YAML estimator spec into river objects, without ever importing arbitrary code.

A spec is a one-key mapping ``{"module.Class": params}``: ``params`` is a mapping of
keyword arguments, a list of positional arguments, a single positional value, or empty.
Parameters may themselves be specs (an optimizer, a base model, a metric). Only classes
defined under the ``river`` package may be named, plus scikit-learn estimators as the
argument of a ``compat.*`` wrapper. The ``dist_func`` parameter of nearest-neighbour
engines takes a name from :data:`DISTANCES` (deterministic pure-Python distances).

>>> build_estimator({"linear_model.LogisticRegression": {"optimizer": {"optim.SGD": {"lr": 0.05}}}})
LogisticRegression (
  optimizer=SGD (
    lr=Constant (
      learning_rate=0.05
    )
  )
...
>>> build_estimator({"os.system": "echo hi"})
Traceback (most recent call last):
...
worker.errors.ModelSpecError: model.os.system: only classes under the river package can be named
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from typing import Any

from river import base, utils

from worker.errors import ModelSpecError

_CLASS_PATH = re.compile(r"^(river\.)?([a-z_][a-z0-9_]*\.)+[A-Z][A-Za-z0-9_]*$")
_SKLEARN_PATH = re.compile(r"^sklearn\.([a-z_][a-z0-9_]*\.)+[A-Z][A-Za-z0-9_]*$")

#: Names accepted for a ``dist_func`` parameter: deterministic distances (summed in key order).
DISTANCES = {
    "euclidean": functools.partial(utils.math.minkowski_distance, p=2),
    "manhattan": functools.partial(utils.math.minkowski_distance, p=1),
}


def is_spec(value: Any) -> bool:
    """A one-key mapping whose key looks like ``module.Class`` (or ``sklearn.module.Class``).

    A key that starts with a river module name counts too (``linear_model.logisticRegression``),
    so that a misspelt class is refused rather than passed on as a plain mapping.
    """
    if not isinstance(value, dict) or len(value) != 1:
        return False
    (name,) = value
    if not isinstance(name, str):
        return False
    if _CLASS_PATH.match(name) or _SKLEARN_PATH.match(name):
        return True
    head = name.removeprefix("river.").split(".")[0]
    return "." in name and head in _river_modules()


@functools.cache
def _river_modules() -> frozenset[str]:
    import pkgutil

    import river

    return frozenset(m.name for m in pkgutil.iter_modules(river.__path__) if not m.name.startswith("_"))


def resolve_class(name: str, *, key: str = "model", allow_sklearn: bool = False) -> type:
    """Resolve ``module.Class`` under ``river`` (or ``sklearn.*`` where allowed) to a class."""
    if _SKLEARN_PATH.match(name):
        if not allow_sklearn:
            raise ModelSpecError(
                key, "scikit-learn estimators are only allowed inside a compat.* wrapper"
            )
        module_name, _, cls_name = name.rpartition(".")
    elif _CLASS_PATH.match(name):
        path = name if name.startswith("river.") else f"river.{name}"
        module_name, _, cls_name = path.rpartition(".")
    elif name.removeprefix("river.").split(".")[0] in _river_modules():
        module_name, _, attr = f"river.{name.removeprefix('river.')}".rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise ModelSpecError(key, "no such class (class names are CamelCase, e.g. optim.SGD)") from None
        raise ModelSpecError(key, f"only classes under the river package can be named, not a {type(found).__name__}")
    else:
        raise ModelSpecError(key, "only classes under the river package can be named")
    root = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError):
        raise ModelSpecError(key, "no such class") from None
    if not inspect.isclass(cls) or not cls.__module__.startswith(root + "."):
        raise ModelSpecError(key, f"not a {root} class")
    if root == "sklearn":
        from sklearn.base import BaseEstimator

        if not issubclass(cls, BaseEstimator):
            raise ModelSpecError(key, "not a scikit-learn estimator")
    return cls


def build_value(value: Any, key: str, allow_sklearn: bool = False) -> Any:
    """A parameter value: specs inside it (at any depth) become objects."""
    if is_spec(value):
        return build_estimator(value, key=key, allow_sklearn=allow_sklearn)
    if isinstance(value, list):
        return [build_value(v, f"{key}[{i}]", allow_sklearn) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: build_value(v, f"{key}.{k}", allow_sklearn) for k, v in value.items()}
    return value


def build_estimator(spec: Any, *, key: str = "model", allow_sklearn: bool = False) -> Any:
    """Build one object from a ``{"module.Class": params}`` spec."""
    if not (isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec)), str)):
        raise ModelSpecError(key, f"expected a one-key mapping {{module.Class: params}}, got {spec!r}")
    ((name, params),) = spec.items()
    key = f"{key}.{name}"
    cls = resolve_class(name, key=key, allow_sklearn=allow_sklearn)
    inner_sklearn = allow_sklearn or name.startswith(("compat.", "river.compat."))
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if params is None or params == {}:
        pass
    elif isinstance(params, dict) and not is_spec(params):
        for pname, pvalue in params.items():
            pkey = f"{key}.{pname}"
            if pname == "dist_func" and isinstance(pvalue, str):
                if pvalue not in DISTANCES:
                    raise ModelSpecError(pkey, f"unknown distance {pvalue!r}; one of {sorted(DISTANCES)}")
                kwargs[pname] = DISTANCES[pvalue]
            else:
                kwargs[pname] = build_value(pvalue, pkey, inner_sklearn)
    elif isinstance(params, list):
        args = [build_value(v, f"{key}[{i}]", inner_sklearn) for i, v in enumerate(params)]
    else:
        args = [build_value(params, key, inner_sklearn)]
    try:
        return cls(*args, **kwargs)
    except Exception as exc:  # river constructors also raise NotImplementedError, AssertionError, ...
        raise ModelSpecError(key, f"cannot build {name}: {exc}") from None


def build_grid(grid: Any, key: str) -> Any:
    """Translate a YAML parameter grid into river's ``expand_param_grid`` form.

    Lists stay lists (their spec items become instances); a spec in a non-list position becomes
    ``(Class, {param: grid})`` so that its own parameters can be lists to expand.
    """
    if isinstance(grid, list):
        return [build_value(v, f"{key}[{i}]", False) for i, v in enumerate(grid)]
    if is_spec(grid):
        ((name, params),) = grid.items()
        key = f"{key}.{name}"
        return (resolve_class(name, key=key), build_grid(params or {}, key))
    if isinstance(grid, dict):
        return {k: build_grid(v, f"{key}.{k}") for k, v in grid.items()}
    raise ModelSpecError(key, f"grid leaves must be lists of values, got {grid!r}")


def compose(steps: list[Any]) -> base.Estimator:
    """Chain steps with ``|`` (a single step stays as it is)."""
    model = steps[0]
    for i, step in enumerate(steps[1:], 1):
        try:
            model = model | step
        except TypeError:
            raise ModelSpecError(f"model.pipeline[{i}]", f"{type(step).__name__} cannot be a pipeline step") from None
    return model
