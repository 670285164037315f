"""The prequential (test-then-train) step: Codec -> Learner -> Monitor for one shard, no I/O.

:class:`Engine` holds what all shards share (settings, decoder, telemetry) and makes
shard states; :class:`Shard` processes one shard's batches. The same code runs in the
live worker, in ``worker evaluate`` / ``worker train``, and in tests.

Order within a batch is the source order. For each record: decode and validate (bad
records become dead letters), predict (``predict_proba_one`` for classifiers, from which the
label is the arg-max exactly as river's ``Classifier.predict_one`` computes it), then
``learn_one`` if the record has a target. Metrics and drift detectors are then updated
in the same order, once per batch.

>>> import orjson
>>> from worker.config import load_settings
>>> engine = Engine(load_settings(data={"model": {"task": "regression", "pipeline": [
...     {"linear_model.LinearRegression": {}}]}}, env={}))
>>> shard = engine.shard("demo")
>>> lines = [orjson.dumps({"id": i, "x": {"a": float(i)}, "y": 2.0 * i}) for i in range(3)]
>>> out = shard.process(lines, [0, 1, 2], now=0.0)
>>> [orjson.loads(v)["prediction"] for _, v in out.predictions]
[0.0, 0.0, 0.12]
>>> shard.state.position
3
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from river import base

from worker.codec import BadRecord, Decoder, dumps, encode_dead_letter
from worker.config import DistributionDriftSettings, Settings
from worker.models import build_model, final_step, spec_hash, uses_imputer
from worker.monitoring.drift import ConceptDrift, DistributionDrift
from worker.monitoring.quality import quality_for
from worker.monitoring.telemetry import Telemetry
from worker.policies import Challenger
from worker.records import Outputs
from worker.state import ShardState

log = logging.getLogger("worker.learning")

Step = Callable[[dict, Any], tuple[Any, Any]]


def make_step(model: base.Estimator, task: str, with_proba: bool = True, threshold: float | None = None) -> Step:
    """The per-record test-then-train function for a task: ``step(x, y) -> (prediction, extra)``.

    ``extra`` is the class probabilities (classification) or the anomaly score.
    """
    learn = model.learn_one
    if task == "classification":
        last = final_step(model)
        predict = model.predict_one
        predict_proba = model.predict_proba_one
        derive = type(last).predict_one is base.Classifier.predict_one
        if with_proba and getattr(last, "estimator", None) is not None and not hasattr(last.estimator, "predict_proba"):
            with_proba = False  # e.g. compat-wrapped SGDClassifier(loss="hinge"): labels only
        if with_proba and derive:

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

            def step(x: dict, y: Any) -> tuple[Any, Any]:
                pred = predict(x)
                if y is not None:
                    learn(x, y)
                return pred, None

    elif task == "regression":
        predict = model.predict_one

        def step(x: dict, y: Any) -> tuple[Any, Any]:
            pred = predict(x)
            if y is not None:
                learn(x, y)
            return pred, None

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


class Engine:
    """What every shard shares: the settings, the decoder, the telemetry, the spec hash."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None):
        self.settings = settings
        self.task = settings.model.task
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.spec = spec_hash(settings.model)
        probe = build_model(settings.model)
        missing = settings.record.missing
        keep_missing = missing == "keep" or (missing == "auto" and uses_imputer(probe))
        self.decoder = Decoder(settings.record, settings.limits, self.task, keep_missing=keep_missing)

    def new_model(self) -> base.Estimator:
        return build_model(self.settings.model)

    def new_concept_detector(self) -> ConceptDrift | None:
        c = self.settings.monitor.drift.concept
        if c.detector is None or self.task not in ("classification", "regression"):
            return None
        return ConceptDrift(c.detector, c.degradation_only)

    def new_state(self, shard: str) -> ShardState:
        """A fresh state: an untrained model from the spec, empty metrics and detectors."""
        m = self.settings.monitor
        return ShardState(
            shard=shard,
            model=self.new_model(),
            quality=quality_for(self.task, m.window),
            concept=self.new_concept_detector(),
            data_drift=_distribution("data", m.drift.data),
            prediction_drift=_distribution("prediction", m.drift.prediction),
        )

    def shard(self, name: str, state: ShardState | None = None) -> Shard:
        return Shard(self, state if state is not None else self.new_state(name))


def _distribution(signal: str, d: DistributionDriftSettings) -> DistributionDrift | None:
    if not d.enabled:
        return None
    return DistributionDrift(
        signal, d.reference_size, d.warmup, d.window, d.check_every, d.test, d.threshold, d.bins, d.max_categories, d.max_features
    )


class Shard:
    """One shard's processing: call :meth:`process` with its messages in source order."""

    def __init__(self, engine: Engine, state: ShardState):
        self.engine = engine
        self.state = state
        s = engine.settings
        self._with_proba = s.model.proba
        self._threshold = s.model.anomaly_threshold
        self._step = make_step(state.model, engine.task, self._with_proba, self._threshold)
        self._every_records = s.monitor.every_records
        self._every_seconds = s.monitor.every_seconds
        self._concept_policy = s.monitor.drift.concept.policy
        self._mini_batch = s.model.mini_batch
        self._freeze = s.monitor.drift.data.policy == "freeze"
        self._since_report = 0
        self._last_report = time.monotonic()
        self._key_field = s.record.key is not None
        task = engine.task
        self._extra_name = "proba" if task == "classification" and s.model.proba else "score" if task == "anomaly" else None
        tel = engine.telemetry
        self._c_learned = tel.records.labels(outcome="learned")
        self._c_predicted = tel.records.labels(outcome="predicted")
        self._c_filtered = tel.records.labels(outcome="filtered")
        self._c_dead = tel.records.labels(outcome="dead_letter")
        self._c_replayed = tel.records.labels(outcome="replayed")
        tel.model_version.labels(shard=state.shard).set(state.model_version)

    def process(
        self,
        values: Sequence[bytes],
        positions: Sequence[int],
        now: float | None = None,
        publish_from: int = 0,
        timestamps: Sequence[float | None] | None = None,
    ) -> Outputs:
        """Test-then-train over one batch; returns the encoded outputs.

        Records at positions below ``state.position`` were already learned and are skipped.
        Records at positions below ``publish_from`` are learned (replay) but publish nothing.
        The stages run one after the other over the batch: decode, data-drift watch, predict
        and learn (with concept drift and its policy per record), quality and prediction drift.
        """
        state = self.state
        tel = self.engine.telemetry
        started = time.perf_counter()
        now = time.time() if now is None else now
        out = Outputs()
        skip_below = state.position
        if positions and positions[-1] < skip_below:
            return out

        # 1. Codec: bytes -> (id, key, x, y, ts, position); bad records -> dead letters
        decode = self.engine.decoder.decode
        records: list = []
        add = records.append
        n_filtered = 0
        last_pos = None
        for i, value in enumerate(values):
            pos = positions[i]
            if pos < skip_below:
                continue
            last_pos = pos
            try:
                decoded = decode(value)
            except BadRecord as bad:
                self._dead(out.dead_letters, value, bad.reason, bad.detail, pos, now, publish_from)
                continue
            if decoded is None:
                n_filtered += 1
                continue
            rid, key, x, y, ts = decoded
            if ts is None and timestamps is not None:
                ts = timestamps[i]
            add((rid, key, x, y, ts, pos, value))
        if last_pos is None:
            return out

        # 2. Data drift: inputs do not depend on the model, so the whole batch is watched first;
        #    with the freeze policy, learning stops from the record after an alarm.
        frozen = self._watch_inputs(out, records, now, publish_from)

        # 3. Learner: predict then learn, record by record
        n_pred, n_learn, labelled, outputs_all = self._learn(out, records, now, publish_from, frozen)

        # 4. Monitor: quality metrics, prediction drift, periodic report
        state.position = last_pos + 1
        n_done = n_pred + n_learn + n_filtered
        state.records_seen += n_done
        outs, out_ids, out_pos = (list(c) for c in zip(*outputs_all)) if outputs_all else ([], [], [])
        if self.engine.task in ("clustering", "anomaly"):
            state.quality.update_many([], outs)
        elif labelled:
            ys, yp, probas = (list(c) for c in zip(*labelled))
            state.quality.update_many(ys, yp, probas if self.engine.task == "classification" else None)
        if state.prediction_drift is not None and outs:
            for event in state.prediction_drift.update_many(outs, out_ids, out_pos):
                self._emit_drift(out, event, now, publish_from)
        if publish_from > 0 and positions[0] < publish_from:
            self._c_replayed.inc(n_done)
        else:
            self._c_learned.inc(n_learn)
            self._c_predicted.inc(n_pred)
            self._c_filtered.inc(n_filtered)
        self._since_report += n_done
        if self._since_report >= self._every_records or time.monotonic() - self._last_report >= self._every_seconds:
            report = self.report(now)
            if state.position > publish_from:
                out.metrics.append((None, report))
        tel.position.labels(shard=state.shard).set(state.position)
        tel.processing.observe(time.perf_counter() - started)
        tel.batch_records.observe(len(values))
        return out

    def _watch_inputs(self, out: Outputs, records: list, now: float, publish_from: int) -> list[bool] | None:
        """Feed the data-drift watch; with the freeze policy, say which records must not be learned.

        An alarm raised at a record freezes learning from the next record on; learning resumes
        after the record at which the last alarm clears.
        """
        dd = self.state.data_drift
        if dd is None or not records:
            return None
        events = dd.update_many([r[2] for r in records], [r[0] for r in records], [r[5] for r in records])
        for event in events:
            self._emit_drift(out, event, now, publish_from)
        if not self._freeze:
            return None
        active = set(dd.alarms)
        for event in reversed(events):  # the alarms as they were before this batch
            (active.discard if event["event"] == "drift" else active.add)(event["feature"])
        if not active and not events:
            return None
        index = {r[5]: i for i, r in enumerate(records)}
        frozen = [bool(active)] * len(records)
        for event in events:
            (active.add if event["event"] == "drift" else active.discard)(event["feature"])
            start = index[event["position"]] + 1
            frozen[start:] = [bool(active)] * (len(records) - start)
        return frozen

    def _learn(self, out: Outputs, records: list, now: float, publish_from: int, frozen: list[bool] | None):
        state = self.state
        shard = state.shard
        step = self._step
        predictions = out.predictions
        key_field = self._key_field
        extra_name = self._extra_name
        score_task = self.engine.task in ("clustering", "anomaly")
        want_outputs = score_task or state.prediction_drift is not None
        concept = state.concept
        regression = self.engine.task == "regression"
        labelled: list = []
        add_labelled = labelled.append
        outputs_all: list = []
        add_output = outputs_all.append
        n_pred = n_learn = 0
        if self._mini_batch > 1:
            done = self._predict_learn_many(records, frozen)
            if done is not None:  # the loop below publishes and scores what was computed
                results = iter(done)
                step = lambda x, y: next(results)  # noqa: E731
        for i, (rid, key, x, y, ts, pos, value) in enumerate(records):
            try:
                pred, extra = step(x, None if frozen is not None and frozen[i] else y)
            except Exception as exc:  # a model that cannot take this record must not stop the shard
                self._dead(out.dead_letters, value, "model_error", f"{type(exc).__name__}: {exc}", pos, now, publish_from)
                continue
            if pos >= publish_from:
                version = state.model_version
                if extra_name is None:
                    rec = {"id": rid, "key": key, "prediction": pred, "model_version": version,
                           "shard": shard, "position": pos, "ts": now if ts is None else ts}
                else:
                    rec = {"id": rid, "key": key, "prediction": pred, extra_name: extra, "model_version": version,
                           "shard": shard, "position": pos, "ts": now if ts is None else ts}
                predictions.append((str(key).encode() if key_field and key is not None else None, dumps(rec)))
            if want_outputs:
                add_output((pred if extra is None or not score_task else extra, rid, pos))
            if score_task:
                n_learn += 1
            elif y is not None:
                add_labelled((y, pred, extra))
                n_learn += 1
                if state.challenger is not None:
                    state.challenger.observe(x, y, pred)
                    verdict = state.challenger.verdict()
                    if verdict is not None:
                        step = self._settle_challenger(out, verdict, rid, pos, now, publish_from)
                if concept is not None:
                    err = (abs(y - pred) if pred is not None else abs(y)) if regression else (0.0 if pred == y else 1.0)
                    if err - err == 0 and concept.update(err):  # (a NaN or infinite error is not fed)
                        self._emit_drift(out, concept.event(rid, pos), now, publish_from)
                        step = self._apply_concept_policy(out, rid, pos, now, publish_from) or step
                        concept = state.concept
            else:
                n_pred += 1
        return n_pred, n_learn, labelled, outputs_all

    def _predict_learn_many(self, records: list, frozen: list[bool] | None) -> list | None:
        """Mini-batch mode: each group of ``model.mini_batch`` records is predicted with the model
        as it was before the group, then learned at once (``predict_*_many`` then ``learn_many``).

        Returns ``(prediction, probabilities)`` per record, or None to go record by record
        (missing values in the group, or a model that refuses the frame).
        """
        import pandas as pd

        model = self.state.model
        classification = self.engine.task == "classification"
        results: list = []
        size = self._mini_batch
        for start in range(0, len(records), size):
            group = records[start : start + size]
            X = pd.DataFrame([r[2] for r in group])
            if X.isna().to_numpy().any() or any(t == object for t in X.dtypes):
                return None
            learn = [i for i, r in enumerate(group) if r[3] is not None and not (frozen and frozen[start + i])]
            try:
                if classification and self._with_proba:
                    P = model.predict_proba_many(X)
                    labels = P.columns.tolist()
                    rows = P.to_numpy().tolist()
                    results += [(labels[max(range(len(row)), key=row.__getitem__)] if row else None, dict(zip(labels, row)))
                                for row in rows]
                else:
                    results += [(p, None) for p in model.predict_many(X).tolist()]
                if learn:
                    model.learn_many(X.iloc[learn], pd.Series([group[i][3] for i in learn], index=X.index[learn]))
            except (TypeError, ValueError, KeyError) as exc:
                if start == 0:
                    log.warning("mini-batch refused, going record by record", extra={"error": repr(exc)})
                    return None
                raise
        return results

    # -- policies --------------------------------------------------------------------------
    def _rebind(self) -> Step:
        """After the model changed (reset, promotion): new step, new prediction-drift reference."""
        self.state.prediction_drift = _distribution("prediction", self.engine.settings.monitor.drift.prediction)
        self._step = make_step(self.state.model, self.engine.task, self._with_proba, self._threshold)
        self.engine.telemetry.model_version.labels(shard=self.state.shard).set(self.state.model_version)
        return self._step

    def _apply_concept_policy(self, out: Outputs, rid: Any, pos: int, now: float, publish_from: int) -> Step | None:
        state = self.state
        policy = self._concept_policy
        if policy == "reset":
            previous = state.model_version
            state.model = self.engine.new_model()
            state.model_version += 1
            state.concept = self.engine.new_concept_detector()
            self._emit(out, {"event": "model_reset", "signal": "concept", "record_id": rid, "position": pos,
                             "previous_version": previous}, now, publish_from)
            return self._rebind()
        if policy == "challenger" and state.challenger is None:
            state.challenger = Challenger(self.engine.new_model(), self.engine.task, pos,
                                          self.engine.settings.monitor.drift.challenger)
            self._emit(out, {"event": "challenger_started", "signal": "concept", "record_id": rid, "position": pos},
                       now, publish_from)
        return None

    def _settle_challenger(self, out: Outputs, verdict: str, rid: Any, pos: int, now: float, publish_from: int) -> Step:
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
            state.model_version += 1
            state.concept = self.engine.new_concept_detector()
            self._emit(out, {"event": "promotion", **event, "previous_version": previous}, now, publish_from)
            return self._rebind()
        self._emit(out, {"event": "challenger_discarded", **event}, now, publish_from)
        return self._step

    # -- outputs ---------------------------------------------------------------------------
    def _dead(self, out: list, value: bytes, reason: str, detail: str, pos: int, now: float, publish_from: int) -> None:
        self._c_dead.inc()
        if pos >= publish_from:
            self.engine.telemetry.dead_letters.labels(reason=reason).inc()
            out.append((None, encode_dead_letter(value, reason, detail, self.state.shard, pos, now)))

    def _emit_drift(self, out: Outputs, event: dict, now: float, publish_from: int) -> None:
        if event["position"] >= publish_from and event["event"] == "drift":
            self.engine.telemetry.drift_events.labels(
                signal=event["signal"], detector=event["detector"], shard=self.state.shard
            ).inc()
        self._emit(out, event, now, publish_from)

    def _emit(self, out: Outputs, event: dict, now: float, publish_from: int) -> None:
        """A drift-output event (drift, drift_cleared, model_reset, challenger_*, promotion)."""
        if event["position"] < publish_from:
            return
        state = self.state
        out.drift.append((None, dumps({**event, "shard": state.shard, "model_version": state.model_version, "ts": now})))

    def pending_report(self, now: float | None = None) -> bytes | None:
        """A last metrics event if records were processed since the previous one (at shutdown)."""
        return self.report(now) if self._since_report else None

    def report(self, now: float | None = None) -> bytes:
        """A metrics event (also sets the Prometheus gauges); resets the report timer."""
        state = self.state
        now = time.time() if now is None else now
        self._since_report = 0
        self._last_report = time.monotonic()
        metrics = state.quality.report()
        tel = self.engine.telemetry
        gauge = tel.model_metric
        for window, values in metrics.items():
            for name, v in values.items():
                if name != "n":
                    gauge.labels(metric=name, window=window, shard=state.shard).set(v)
        drift: dict[str, Any] = {}
        for watch in (state.data_drift, state.prediction_drift):
            if watch is not None:
                stats = watch.statistics()
                for name, v in stats.items():
                    tel.feature_drift.labels(signal=watch.signal, feature=name, shard=state.shard).set(v)
                drift[watch.signal] = {"alarms": watch.alarms, "statistics": stats}
        challenger = state.challenger
        return dumps(
            {
                "event": "metrics",
                "shard": state.shard,
                "model_version": state.model_version,
                "position": state.position,
                "records": state.records_seen,
                **metrics,
                "drift": drift,
                "challenger": None if challenger is None else {
                    "started_at": challenger.started_at, "records": challenger.seen,
                    "scores": dict(zip(("champion", "challenger"), challenger.scores())),
                },
                "ts": now,
            }
        )
