"""The model side of a shard: predict then learn, record by record, with concept drift and its policies.

This is the one stage that must run in record order on the model's state; everything
around it (decoding, the data-drift watch, encoding outputs, quality metrics, prediction
drift, the transport) only reads its results. :class:`Learner` does that stage for one
shard. It works on the learner fields of a :class:`~worker.state.ShardState` (``model``,
``concept``, ``challenger``, ``model_version``) and returns, per batch, a
:class:`LearnResult`: the predictions, the per-record model version when it changed, the
records the model refused, and the concept-drift and policy events.

Two hosts keep a worker's learners, with the same interface:

- :class:`InlineLearners` runs them in this process (``worker evaluate``, tests,
  ``learner: inline``);
- :class:`ProcessLearners` runs them in one child process (``learner: process``, the
  default of ``worker run``), so that learning on one core overlaps with decoding,
  encoding and the transport on the other. A learn request crosses the pipe as one orjson
  document per poll (its features came from JSON; orjson's key cache gives the child the
  same key objects batch after batch, which river's dict lookups like), results as one
  pickle; requests queue up in the child, so the runtime can keep more than one poll in
  flight (``limits.polls_in_flight``).

>>> from worker.config import load_settings
>>> from worker.state import ShardState
>>> settings = load_settings(data={"model": {"task": "regression", "pipeline": [
...     {"linear_model.LinearRegression": {}}]}}, env={})
>>> config = LearnerConfig(settings)
>>> learner = Learner(config, ShardState(shard="s", model=config.new_model(), concept=config.new_concept_detector()))
>>> result = learner.learn([{"a": 0.0}, {"a": 1.0}, {"a": 2.0}], [0.0, 2.0, 4.0], [0, 1, 2], [0, 1, 2], None)
>>> result.preds
[0.0, 0.0, 0.12]
"""

from __future__ import annotations

import itertools
import logging
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from river import base

from worker import affinity
from worker.errors import WorkerError
from worker.models import build_model, calls, final_step
from worker.monitoring.drift import ConceptDrift
from worker.policies import Challenger
from worker.state import LEARNER_FIELDS, ShardState, join_learner, pickle_learner

log = logging.getLogger("worker.learner")

Step = Callable[[dict, Any], tuple[Any, Any]]


class LearnerError(WorkerError):
    """The learner process failed or died; the worker cannot go on (exit code 1)."""


def _has_proba(model: base.Estimator) -> bool:
    """False for a classifier that gives labels only (e.g. compat-wrapped SGDClassifier(loss="hinge"))."""
    last = final_step(model)
    return getattr(last, "estimator", None) is None or hasattr(last.estimator, "predict_proba")


def labels_from_proba(model: base.Estimator, task: str, with_proba: bool) -> bool:
    """Whether the model's label is the arg-max of the probabilities computed anyway (river's
    own ``Classifier.predict_one``): the label can then be taken from them (:func:`label_of`)."""
    return (task == "classification" and with_proba and _has_proba(model)
            and type(final_step(model)).predict_one is base.Classifier.predict_one)


def label_of(proba: dict | None) -> Any:
    """The label river's ``Classifier.predict_one`` gives for these probabilities (first of equals).

    >>> label_of({"a": 0.25, "b": 0.75}), label_of({0: 0.5, 1: 0.5}), label_of({})
    ('b', 0, None)
    """
    return max(proba, key=proba.get) if proba else None


def make_step(model: base.Estimator, task: str, with_proba: bool = True, threshold: float | None = None) -> Step:
    """The per-record test-then-train function for a task: ``step(x, y) -> (prediction, extra)``.

    ``extra`` is the class probabilities (classification) or the anomaly score.
    """
    direct = calls(model)
    learn = direct.learn_one
    if task == "classification":
        last = final_step(model)
        predict = direct.predict_one
        predict_proba = direct.predict_proba_one
        if with_proba and not _has_proba(model):
            with_proba = False  # labels only
        if labels_from_proba(model, task, with_proba):

            def step(x: dict, y: Any) -> tuple[Any, Any]:
                proba = predict_proba(x)
                pred = max(proba, key=proba.get) if proba else None
                if y is not None:
                    learn(x, y)
                return pred, proba

        elif with_proba:
            has_proba = type(last).predict_proba_one is not base.Classifier.predict_proba_one

            def step(x: dict, y: Any) -> tuple[Any, Any]:
                proba = predict_proba(x) if has_proba else None
                pred = predict(x)
                if y is not None:
                    learn(x, y)
                return pred, proba

        else:
            step = _predict_then_learn(predict, learn)

    elif task == "regression":
        step = _predict_then_learn(direct.predict_one, learn)

    elif task == "clustering":
        predict = model.predict_one

        def step(x: dict, y: Any) -> tuple[Any, Any]:
            pred = predict(x)
            learn(x)
            return pred, None

    else:  # anomaly
        score_one = model.score_one

        def step(x: dict, y: Any) -> tuple[Any, Any]:
            score = score_one(x)
            learn(x)
            return (score >= threshold if threshold is not None else None), score

    return step


def _predict_then_learn(predict: Callable, learn: Callable) -> Step:
    def step(x: dict, y: Any) -> tuple[Any, Any]:
        pred = predict(x)
        if y is not None:
            learn(x, y)
        return pred, None

    return step


class LearnerConfig:
    """What every learner of a worker shares: built from the settings (picklable, for the child)."""

    def __init__(self, settings: Any):
        self.settings = settings
        m = settings.model
        self.task = m.task
        self.with_proba = m.proba
        self.threshold = m.anomaly_threshold
        self.mini_batch = m.mini_batch
        self.cpu_affinity = settings.cpu_affinity
        drift = settings.monitor.drift
        self.concept_policy = drift.concept.policy
        self.challenger = drift.challenger
        #: With the alert policy concept drift only watches the (label, prediction) stream, so the
        #: monitor runs it (:meth:`worker.learning.Shard.finish`); reset and challenger act on the model.
        self.owns_concept = self.concept_policy != "alert"
        self.fields = LEARNER_FIELDS if self.owns_concept else tuple(f for f in LEARNER_FIELDS if f != "concept")

    def new_model(self) -> base.Estimator:
        return build_model(self.settings.model)

    def new_concept_detector(self) -> ConceptDrift | None:
        c = self.settings.monitor.drift.concept
        if c.detector is None or self.task not in ("classification", "regression"):
            return None
        return ConceptDrift(c.detector, c.degradation_only)

    def step(self, model: base.Estimator) -> Step:
        return make_step(model, self.task, self.with_proba, self.threshold)


@dataclass
class LearnResult:
    """What one batch of the learner gives back, aligned with its records.

    ``preds`` is None when the labels are the arg-max of ``extras`` and nothing in the
    learner needed them (no record-level policy): :meth:`labels` derives them then, in the
    worker process, which has time to spare while the learner is the bottleneck.
    ``versions`` is None when the model version did not change in the batch (every record
    was predicted by version ``version_before``); ``errors`` maps a record's index to the
    model's exception (its ``preds`` entry is None); ``events`` are concept-drift and policy
    events (with ``position`` and ``model_version``); ``changed`` says the model was replaced.
    """

    preds: list | None
    extras: list
    versions: list[int] | None
    version_before: int
    version: int
    errors: dict[int, str] | None
    events: list[dict]
    changed: bool
    challenger: dict | None
    seconds: float

    def labels(self) -> list:
        """The predictions, one per record (None for a record the model refused)."""
        return self.preds if self.preds is not None else [label_of(p) for p in self.extras]


class Learner:
    """Test-then-train for one shard, on the learner fields of ``state``."""

    def __init__(self, config: LearnerConfig, state: ShardState):
        self.config = config
        self.state = state
        self._step = config.step(state.model)
        self._warned: set[str] = set()  # mini-batch fallbacks already logged

    def learn(
        self,
        xs: Sequence[dict],
        ys: Sequence[Any],
        rids: Sequence[Any],
        positions: Sequence[int],
        frozen: Sequence[bool] | None,
    ) -> LearnResult:
        """Predict then learn each record in order (a frozen record is predicted only)."""
        started = time.perf_counter()
        state = self.state
        config = self.config
        task = config.task
        step = self._step
        concept = state.concept if config.owns_concept else None
        challenger = state.challenger
        version_before = version = state.model_version
        # Nothing to watch record by record (mini-batches come with no record-level policy):
        if config.mini_batch > 1 or (concept is None and challenger is None and frozen is None):
            preds, extras, errors = (self._predict_learn_many(xs, ys, frozen) if config.mini_batch > 1
                                     else self._plain(xs, ys))
            return LearnResult(preds=preds, extras=extras, versions=None, version_before=version, version=version,
                               errors=errors, events=[], changed=False, challenger=None,
                               seconds=time.perf_counter() - started)
        score_task = task in ("clustering", "anomaly")
        regression = task == "regression"
        preds: list = []
        extras: list = []
        add_pred, add_extra = preds.append, extras.append
        versions: list[int] | None = None
        errors: dict[int, str] | None = None
        events: list[dict] = []
        changed = False
        for i, x in enumerate(xs):
            y = ys[i]
            if versions is not None:
                versions.append(version)
            try:
                pred, extra = step(x, None if frozen is not None and frozen[i] else y)
            except Exception as exc:  # a model that cannot take this record must not stop the shard
                if errors is None:
                    errors = {}
                errors[i] = f"{type(exc).__name__}: {exc}"
                add_pred(None)
                add_extra(None)
                continue
            add_pred(pred)
            add_extra(extra)
            if y is None or score_task:
                continue
            acted = False
            if challenger is not None:
                try:
                    challenger.observe(x, y, pred)
                except Exception as exc:  # a challenger that cannot take this record is given up, not the shard
                    self._settle_challenger(events, "discard", rids[i], positions[i],
                                            f"{type(exc).__name__}: {exc}")
                    acted = True
                else:
                    verdict = challenger.verdict()
                    if verdict is not None:
                        self._settle_challenger(events, verdict, rids[i], positions[i])
                        acted = True
            if concept is not None:
                if concept.observe(y, pred, regression):
                    events.append({**concept.event(rids[i], positions[i]), "model_version": state.model_version})
                    self._apply_concept_policy(events, rids[i], positions[i])
                    acted = True
            if acted:  # a policy may have replaced the model, the detector or the challenger
                concept, challenger = (state.concept if config.owns_concept else None), state.challenger
                if state.model_version != version:  # the next records are predicted by the new model
                    version = state.model_version
                    step = self._step
                    changed = True
                    if versions is None:
                        versions = [version_before] * (i + 1)
        return LearnResult(
            preds=preds,
            extras=extras,
            versions=versions,
            version_before=version_before,
            version=state.model_version,
            errors=errors,
            events=events,
            changed=changed,
            challenger=None if challenger is None else challenger.summary(),
            seconds=time.perf_counter() - started,
        )

    def _plain(self, xs: Sequence[dict], ys: Sequence[Any]) -> tuple[list | None, list, dict[int, str] | None]:
        """Predict then learn each record with no policy watching: ``(predictions, extras, errors)``,
        the predictions None when they are the arg-max of the probabilities (see :class:`LearnResult`)."""
        errors: dict[int, str] | None = None
        model = self.state.model
        if labels_from_proba(model, self.config.task, self.config.with_proba):
            direct = calls(model)  # (once per batch: a few attribute look-ups)
            predict_proba, learn = direct.predict_proba_one, direct.learn_one
            extras: list = []
            add = extras.append
            for i, x in enumerate(xs):
                y = ys[i]
                try:
                    proba = predict_proba(x)
                    if y is not None:
                        learn(x, y)
                except Exception as exc:  # a model that cannot take this record must not stop the shard
                    if errors is None:
                        errors = {}
                    errors[i] = f"{type(exc).__name__}: {exc}"
                    proba = None
                add(proba)
            return None, extras, errors
        step = self._step
        preds: list = []
        extras = []
        add_pred, add_extra = preds.append, extras.append
        for i, x in enumerate(xs):
            try:
                pred, extra = step(x, ys[i])
            except Exception as exc:
                if errors is None:
                    errors = {}
                errors[i] = f"{type(exc).__name__}: {exc}"
                pred = extra = None
            add_pred(pred)
            add_extra(extra)
        return preds, extras, errors

    def _predict_learn_many(self, xs: Sequence[dict], ys: Sequence[Any], frozen: Sequence[bool] | None) -> tuple:
        """Mini-batch mode: each group of ``model.mini_batch`` records is predicted with the model
        as it was before the group, then learned at once (``predict_*_many`` then ``learn_many``).

        Returns ``(predictions, probabilities, errors)``: a list each (probabilities None per
        record without them) and the records the model refused (index -> message) or None.
        A group that cannot be a frame (missing or non-numeric values, keys that differ) or
        whose prediction the model refuses goes record by record, as without mini-batches;
        one whose ``learn_many`` fails is learned record by record after its predictions
        (the steps before the failing one may then have learned that group once already).
        """
        import pandas as pd

        model = self.state.model
        proba = self.config.task == "classification" and self.config.with_proba
        preds: list = []
        extras: list = []
        errors: dict[int, str] = {}
        size = self.config.mini_batch
        for start in range(0, len(xs), size):
            group = xs[start : start + size]
            X = _frame(group)
            learn = [] if X is None else [
                i for i in range(len(X)) if ys[start + i] is not None and not (frozen and frozen[start + i])]
            try:
                if X is None:
                    raise _NotAFrame
                if proba:
                    P = model.predict_proba_many(X)
                    labels = P.columns.tolist()
                    values = P.to_numpy()
                    if not labels:  # nothing learned yet
                        group_preds = [None] * len(values)
                        group_extras = [{} for _ in range(len(values))]
                    else:  # the arg-max, first of equals, as predict_one takes it
                        group_preds = [labels[j] for j in values.argmax(axis=1).tolist()]
                        if len(labels) == 2:  # two literal keys: about half the cost of dict(zip(...))
                            a, b = labels
                            group_extras = [{a: p, b: q} for p, q in values.tolist()]
                        else:
                            group_extras = [dict(zip(labels, row)) for row in values.tolist()]
                else:
                    group_preds = model.predict_many(X).tolist()
                    group_extras = [None] * len(X)
            except (_NotAFrame, TypeError, ValueError, KeyError) as exc:
                if not isinstance(exc, _NotAFrame):
                    self._warn_once("mini-batch prediction refused, such groups go record by record", exc)
                self._records(start, group, ys, frozen, preds, extras, errors)
                continue
            preds += group_preds
            extras += group_extras
            if learn:
                try:
                    model.learn_many(X.iloc[learn], pd.Series([ys[start + i] for i in learn], index=X.index[learn]))
                except (TypeError, ValueError, KeyError) as exc:
                    self._warn_once("mini-batch learning refused, such groups are learned record by record", exc)
                    for i in learn:
                        try:
                            model.learn_one(group[i], ys[start + i])
                        except Exception as one:  # noqa: BLE001 - as record by record: a model_error
                            errors[start + i] = f"{type(one).__name__}: {one}"
        return preds, extras, errors or None

    def _warn_once(self, message: str, exc: Exception) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message, extra={"shard": self.state.shard, "error": repr(exc)})

    def _records(self, start: int, group: Sequence[dict], ys: Sequence[Any], frozen: Sequence[bool] | None,
                 preds: list, extras: list, errors: dict[int, str]) -> None:
        """One mini-batch group record by record (predict then learn each)."""
        step = self._step
        for j, x in enumerate(group):
            i = start + j
            try:
                pred, extra = step(x, None if frozen is not None and frozen[i] else ys[i])
            except Exception as exc:  # noqa: BLE001 - a model that cannot take this record must not stop the shard
                errors[i] = f"{type(exc).__name__}: {exc}"
                pred = extra = None
            preds.append(pred)
            extras.append(extra)

    # -- policies --------------------------------------------------------------------------
    def _new_model(self) -> None:
        """The model was replaced (reset, promotion): new version, new detector, new step."""
        state = self.state
        state.model_version += 1
        state.concept = self.config.new_concept_detector()
        self._step = self.config.step(state.model)

    def _apply_concept_policy(self, events: list, rid: Any, pos: int) -> None:
        state = self.state
        policy = self.config.concept_policy
        if policy == "reset":
            previous = state.model_version
            state.model = self.config.new_model()
            self._new_model()
            events.append({"event": "model_reset", "signal": "concept", "record_id": rid, "position": pos,
                           "previous_version": previous, "model_version": state.model_version})
        elif policy == "challenger" and state.challenger is None:
            state.challenger = Challenger(self.config.new_model(), self.config.task, pos, self.config.challenger)
            events.append({"event": "challenger_started", "signal": "concept", "record_id": rid, "position": pos,
                           "model_version": state.model_version})

    def _settle_challenger(self, events: list, verdict: str, rid: Any, pos: int, error: str | None = None) -> None:
        """Promote or discard the challenger; ``error``: it is discarded because it failed on this record."""
        state = self.state
        challenger = state.challenger
        champion_score, challenger_score = challenger.scores()
        event = {"record_id": rid, "position": pos, "signal": "concept", "champion_score": champion_score,
                 "challenger_score": challenger_score, "challenger_records": challenger.seen,
                 "started_at": challenger.started_at}
        state.challenger = None
        if verdict == "promote":
            previous = state.model_version
            state.model = challenger.model
            self._new_model()
            events.append({"event": "promotion", **event, "previous_version": previous,
                           "model_version": state.model_version})
        else:
            reason = {"reason": "max_records"} if error is None else {"reason": "model_error", "detail": error}
            events.append({"event": "challenger_discarded", **event, **reason, "model_version": state.model_version})


class _NotAFrame(Exception):
    """A mini-batch group that cannot be a frame (it goes record by record)."""


def _frame(xs: Sequence[dict]) -> Any:
    """The records as one numeric pandas frame, or None when they cannot be one: keys that
    differ (or come in another order) from record to record, a missing value, a value that
    is not a number. Built from one flat array rather than from the dicts (several times
    faster at 10 features)."""
    import numpy as np
    import pandas as pd

    keys = list(xs[0])
    if not all(list(x) == keys for x in xs):
        return None
    try:
        values = np.array(list(itertools.chain.from_iterable(x.values() for x in xs)))
    except (TypeError, ValueError):  # e.g. a list among numbers
        return None
    if values.dtype.kind not in "biuf" or values.size != len(xs) * len(keys):
        return None  # a string, None, a list...: record by record decides what the model makes of it
    values = values.reshape(len(xs), len(keys))
    if values.dtype.kind == "f" and np.isnan(values).any():
        return None
    return pd.DataFrame(np.asfortranarray(values), columns=keys, copy=False)  # columns contiguous, as pandas keeps them


# -- hosts -------------------------------------------------------------------------------
#: One learn request per shard batch: (shard, xs, ys, record ids, positions, frozen or None).
Request = tuple[str, list, list, list, list, "list[bool] | None"]


def _dump_all(learners: dict[str, Learner], config: LearnerConfig) -> dict[str, bytes]:
    """Every learner's fields, pickled as they are now (the learner's half of a snapshot)."""
    return {name: pickle_learner(learner.state, config.fields) for name, learner in learners.items()}


class InlineLearners:
    """The learners of a worker, in this process: :meth:`submit` computes at once.

    Results (and dumps) are handed out by :meth:`collect`, oldest submission first, as
    :class:`ProcessLearners` does, so the runtime drives both the same way.
    """

    pid: int | None = None  #: no process of their own (see ProcessLearners.pid)

    def __init__(self, config: LearnerConfig):
        self.config = config
        self._learners: dict[str, Learner] = {}
        self._results: deque[tuple[list[LearnResult], dict[str, bytes] | None]] = deque()
        self._dumps: dict[str, bytes] | None = None

    @property
    def pending(self) -> int:
        """Submissions whose results were not collected yet."""
        return len(self._results)

    def load(self, state: ShardState, fresh: bool = False) -> None:
        """Own ``state``'s learner from now on (it keeps working on that same state object)."""
        self._learners[state.shard] = Learner(self.config, state)

    def drop(self, shard: str) -> None:
        self._learners.pop(shard, None)

    def submit(self, requests: list[Request], dump: bool = False) -> None:
        """Learn ``requests`` (with ``dump``: every learner's fields are pickled first, as they
        are now; see :meth:`take_dumps`)."""
        dumps = _dump_all(self._learners, self.config) if dump else None
        self._results.append(([self._learners[r[0]].learn(*r[1:]) for r in requests], dumps))

    def has_result(self) -> bool:
        """Whether :meth:`collect` would not wait."""
        return bool(self._results)

    def collect(self) -> list[LearnResult]:
        """The results of the oldest submission not collected yet."""
        assert self._results, "nothing in flight"
        results, dumps = self._results.popleft()
        if dumps is not None:
            self._dumps = dumps
        return results

    def take_dumps(self) -> dict[str, bytes] | None:
        """The learner fields asked for with ``submit(..., dump=True)``, once its results were collected."""
        dumps, self._dumps = self._dumps, None
        return dumps

    def ready(self) -> None:
        """Nothing to wait for."""

    def dump(self, shard: str) -> bytes | None:
        """None: the shard's state object already holds its learner fields."""
        return None

    def close(self) -> None:
        self._learners.clear()


class ProcessLearners:
    """The learners of a worker in one child process (spawned), spoken to over a pipe.

    Requests queue up in the child (a thread there reads the pipe as soon as anything
    arrives), so the parent can hand over the next poll while the child still learns the
    previous one, and a send never waits for the child's learning. Replies come back in
    the order of the requests. The child ignores SIGINT/SIGTERM (the parent decides when
    to stop) and exits when the pipe closes, including when the parent was killed.
    """

    def __init__(self, config: LearnerConfig, start_timeout: float = 120.0):
        import multiprocessing

        self.config = config
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        split = affinity.plan(config.cpu_affinity)
        self._proc = ctx.Process(target=_serve, args=(child, config, None if split is None else split.learner),
                                 name="worker-learner", daemon=True)
        # Born with SIGINT/SIGTERM blocked (the mask survives exec), so a stop sent to the whole
        # group during its start-up cannot kill it; here they stay pending, not lost.
        stops = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            self._proc.start()  # its imports overlap with the caller's start-up: the first message waits
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self._unpin: set[int] | None = None  # this process's CPUs before the split, restored at close()
        if split is not None:
            self._unpin = affinity.allowed_cpus()
            try:
                affinity.pin_process(split.worker)
            except OSError as exc:
                log.warning("cpu_affinity: could not pin the worker's threads (%s); they run where the system puts "
                            "them", exc)
            else:
                log.info("cpu_affinity: the learner process runs on CPU %d, the worker on CPU %s", split.learner,
                         ",".join(map(str, sorted(split.worker))))
        self._start_timeout: float | None = start_timeout
        self._outstanding = 0  # learn replies not collected yet (read or not)
        self._early: deque[Any] = deque()  # learn replies read ahead of a dump reply (decoded)
        self._dumps: dict[str, bytes] | None = None

    def ready(self) -> None:
        """Wait until the child is up (the first message would wait anyway)."""
        if self._start_timeout is not None:
            self._wait_ready()

    def _wait_ready(self) -> None:
        timeout, self._start_timeout = self._start_timeout, None
        if not self._conn.poll(timeout):
            self.close()
            raise LearnerError(f"the learner process did not start within {timeout:.0f} s")
        self._recv()  # "ready"

    @property
    def pending(self) -> int:
        """Submissions whose results were not collected yet."""
        return self._outstanding

    @property
    def pid(self) -> int | None:
        """The learner process's id (None before it started)."""
        return self._proc.pid

    def _send(self, message: tuple) -> None:
        self._send_bytes(b"P" + pickle.dumps(message, protocol=5))

    def _send_bytes(self, data: bytes) -> None:
        if self._start_timeout is not None:
            self._wait_ready()
        try:
            self._conn.send_bytes(data)
        except OSError as exc:
            raise self._died() from exc

    def _recv(self) -> Any:
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        kind, payload = pickle.loads(data)
        if kind == "error":
            raise LearnerError(f"the learner process failed:\n{payload}")
        return payload

    def _died(self) -> LearnerError:
        """The child is gone: its own account of why, if it sent one before exiting."""
        try:
            while self._conn.poll(0):  # (replies it sent before the error come first)
                kind, payload = pickle.loads(self._conn.recv_bytes())
                if kind == "error":
                    self._proc.join(1.0)
                    return LearnerError(f"the learner process failed:\n{payload}")
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        self._proc.join(1.0)
        return LearnerError(f"the learner process died (exit code {self._proc.exitcode})")

    def load(self, state: ShardState, fresh: bool = False) -> None:
        """Hand the shard's learner fields to the child; this process keeps only ``model_version``.

        ``fresh``: the state is new from the spec, so the child builds its own from the spec
        (the same model: specs are deterministic). A model that went through pickle learns
        more slowly: its dicts' keys are other string objects than the records' keys, so
        every lookup compares strings (about 17 % for StandardScaler | LogisticRegression).
        """
        self._send(("new", state.shard) if fresh else ("load", state.shard, pickle_learner(state, self.config.fields)))
        for name in self.config.fields:
            if name != "model_version":
                setattr(state, name, None)

    def drop(self, shard: str) -> None:
        self._send(("drop", shard))

    def submit(self, requests: list[Request], dump: bool = False) -> None:
        """Queue ``requests`` behind those in flight (with ``dump``: the child first pickles every
        learner's fields, as of the requests before; see :meth:`take_dumps`). The request is
        one orjson document, the results come back as one pickle."""
        self._send_bytes((b"D" if dump else b"L") + orjson.dumps(requests))
        self._outstanding += 1

    def has_result(self) -> bool:
        """Whether the oldest submission's results are back (:meth:`collect` would not wait)."""
        if not self._outstanding:
            return False
        if self._early:
            return True
        try:
            return self._conn.poll(0)
        except OSError:
            return True  # collect() says what happened

    def collect(self) -> list[LearnResult]:
        """The results of the oldest submission not collected yet (waits for them)."""
        assert self._outstanding, "nothing in flight"
        results, dumps = self._early.popleft() if self._early else self._recv()
        self._outstanding -= 1
        if dumps is not None:
            self._dumps = dumps
        return results

    def take_dumps(self) -> dict[str, bytes] | None:
        """The learner fields asked for with ``submit(..., dump=True)``, once its results were collected."""
        dumps, self._dumps = self._dumps, None
        return dumps

    def dump(self, shard: str) -> bytes:
        """The pickled learner fields of ``shard``, as of the last batch submitted for it (the
        replies to the learn requests before it are read and kept for :meth:`collect`)."""
        self._send(("dump", shard))
        while len(self._early) < self._outstanding:
            self._early.append(self._recv())
        return self._recv()

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(1.0)
        if self._unpin is not None:  # (a process that outlives its learner, e.g. a benchmark, gets its CPUs back)
            unpin, self._unpin = self._unpin, None
            try:
                affinity.pin_process(unpin)
            except OSError:
                pass


def _serve(conn: Any, config: LearnerConfig, cpu: int | None = None) -> None:
    """The child's loop: one message at a time, in order, at most one reply each, until the pipe closes.
    ``cpu``: the one CPU this process runs on (``cpu_affinity``)."""
    import gc

    from worker.logs import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    telemetry = config.settings.telemetry
    setup_logging(telemetry.log_level, telemetry.log_format)  # the worker's format, on the same stderr
    if cpu is not None:
        try:
            affinity.pin_process({cpu})
        except OSError as exc:
            log.warning("cpu_affinity: could not pin the learner process to CPU %d (%s)", cpu, exc)
    learners: dict[str, Learner] = {}
    config.new_model()  # imports the spec's river modules now, during start-up, not at the first shard
    gc.freeze()  # the imported modules live as long as the process
    # Each batch makes ~10 short-lived objects per record, all freed by reference counting;
    # the default threshold (700) would run ~40 young collections per batch over them.
    gc.set_threshold(100_000, 20, 100)
    try:
        conn.send_bytes(pickle.dumps(("ready", None)))
    except OSError:  # the parent went away during our start-up
        return
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # the pipe is emptied at once, so that the parent never waits to send
        try:
            while True:
                inbox.put(conn.recv_bytes())
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read, name="learner-inbox", daemon=True).start()
    try:
        while True:
            data = inbox.get()
            if data is None:  # the pipe closed
                return
            if data[:1] in (b"L", b"D"):  # learn (D: dump every learner first)
                dumps = _dump_all(learners, config) if data[:1] == b"D" else None
                results = [learners[r[0]].learn(*r[1:]) for r in orjson.loads(memoryview(data)[1:])]
                conn.send_bytes(pickle.dumps(("ok", (results, dumps)), protocol=5))
                continue
            message = pickle.loads(memoryview(data)[1:])  # P: a control message
            kind = message[0]
            if kind == "load":
                _, shard, blob = message
                learners[shard] = Learner(config, join_learner(ShardState(shard=shard, model=None), blob))
                continue
            elif kind == "new":
                state = ShardState(shard=message[1], model=config.new_model(),
                                   concept=config.new_concept_detector() if config.owns_concept else None)
                learners[message[1]] = Learner(config, state)
                continue
            elif kind == "drop":
                learners.pop(message[1], None)
                continue
            elif kind == "dump":
                reply = pickle_learner(learners[message[1]].state, config.fields)
            else:
                raise ValueError(f"unknown message {kind!r}")
            conn.send_bytes(pickle.dumps(("ok", reply), protocol=5))
    except BaseException:  # noqa: BLE001 - report it to the parent, then exit
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        except OSError:
            pass
        raise SystemExit(1) from None


def open_learners(settings: Any) -> InlineLearners | ProcessLearners:
    """The host ``settings.learner`` asks for."""
    config = LearnerConfig(settings)
    return ProcessLearners(config) if settings.learner == "process" else InlineLearners(config)
