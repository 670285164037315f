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

import time
from collections.abc import Callable, Sequence
from typing import Any

from river import base

from worker.codec import BadRecord, Decoder, dumps, encode_dead_letter
from worker.config import Settings
from worker.models import build_model, final_step, spec_hash, uses_imputer
from worker.monitoring.drift import ConceptDrift
from worker.monitoring.quality import quality_for
from worker.monitoring.telemetry import Telemetry
from worker.records import Outputs
from worker.state import ShardState

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

    def new_state(self, shard: str) -> ShardState:
        """A fresh state: an untrained model from the spec, empty metrics and detectors."""
        s = self.settings
        detectors = []
        if s.monitor.drift.detector is not None and self.task in ("classification", "regression"):
            detectors.append(ConceptDrift(s.monitor.drift.detector))
        return ShardState(
            shard=shard,
            model=build_model(s.model),
            quality=quality_for(self.task, s.monitor.window),
            detectors=detectors,
        )

    def shard(self, name: str, state: ShardState | None = None) -> Shard:
        return Shard(self, state if state is not None else self.new_state(name))


class Shard:
    """One shard's processing: call :meth:`process` with its messages in source order."""

    def __init__(self, engine: Engine, state: ShardState):
        self.engine = engine
        self.state = state
        s = engine.settings
        self._step = make_step(state.model, engine.task, s.model.proba, s.model.anomaly_threshold)
        self._every_records = s.monitor.every_records
        self._every_seconds = s.monitor.every_seconds
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
        """
        state = self.state
        tel = self.engine.telemetry
        started = time.perf_counter()
        now = time.time() if now is None else now
        shard, version = state.shard, state.model_version
        decode = self.engine.decoder.decode
        step = self._step
        out = Outputs()
        predictions = out.predictions
        dead_letters = out.dead_letters
        key_field = self._key_field
        labelled: list = []  # (y, prediction, proba, id, position) of labelled records, for the monitor
        add_labelled = labelled.append
        outputs_all: list = []  # clustering/anomaly: every output feeds the monitor
        n_pred = n_learn = n_filtered = 0
        skip_below = state.position
        last_pos = None
        classification = self.engine.task == "classification"
        score_task = self.engine.task in ("clustering", "anomaly")
        extra_name = self._extra_name
        for i, value in enumerate(values):
            pos = positions[i]
            if pos < skip_below:
                continue
            last_pos = pos
            try:
                decoded = decode(value)
            except BadRecord as bad:
                self._dead(dead_letters, value, bad.reason, bad.detail, pos, now, publish_from)
                continue
            if decoded is None:
                n_filtered += 1
                continue
            rid, key, x, y, ts = decoded
            try:
                pred, extra = step(x, y)
            except Exception as exc:  # a model that cannot take this record must not stop the shard
                self._dead(dead_letters, value, "model_error", f"{type(exc).__name__}: {exc}", pos, now, publish_from)
                continue
            if pos >= publish_from:
                if ts is None and timestamps is not None:
                    ts = timestamps[i]
                if extra_name is None:
                    rec = {"id": rid, "key": key, "prediction": pred, "model_version": version,
                           "shard": shard, "position": pos, "ts": now if ts is None else ts}
                else:
                    rec = {"id": rid, "key": key, "prediction": pred, extra_name: extra, "model_version": version,
                           "shard": shard, "position": pos, "ts": now if ts is None else ts}
                predictions.append((str(key).encode() if key_field and key is not None else None, dumps(rec)))
            if score_task:
                outputs_all.append(pred if extra is None else extra)
                n_learn += 1
            elif y is not None:
                add_labelled((y, pred, extra, rid, pos))
                n_learn += 1
            else:
                n_pred += 1
        if last_pos is None:
            return out
        state.position = last_pos + 1
        n_done = n_pred + n_learn + n_filtered
        state.records_seen += n_done
        quality = state.quality
        if score_task:
            quality.update_many([], outputs_all)
        elif labelled:
            ys, yp, probas, ids, lpos = (list(c) for c in zip(*labelled))
            quality.update_many(ys, yp, probas if classification else None)
            if state.detectors:
                errors = quality.errors(ys, yp)
                for det in state.detectors:
                    for event in det.update_many(errors, ids, lpos):
                        self._drift(out, event, now, publish_from)
        replayed = publish_from > 0 and positions[0] < publish_from
        if replayed:
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
        tel.position.labels(shard=shard).set(state.position)
        tel.processing.observe(time.perf_counter() - started)
        tel.batch_records.observe(len(values))
        return out

    def _dead(self, out: list, value: bytes, reason: str, detail: str, pos: int, now: float, publish_from: int) -> None:
        self._c_dead.inc()
        if pos >= publish_from:
            self.engine.telemetry.dead_letters.labels(reason=reason).inc()
            out.append((None, encode_dead_letter(value, reason, detail, self.state.shard, pos, now)))

    def _drift(self, out: Outputs, event: dict, now: float, publish_from: int) -> None:
        if event["position"] < publish_from:
            return
        state = self.state
        self.engine.telemetry.drift_events.labels(
            signal=event["signal"], detector=event["detector"], shard=state.shard
        ).inc()
        out.drift.append(
            (None, dumps({"event": "drift", **event, "shard": state.shard, "model_version": state.model_version, "ts": now}))
        )

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
        gauge = self.engine.telemetry.model_metric
        for window, values in metrics.items():
            for name, v in values.items():
                if name != "n":
                    gauge.labels(metric=name, window=window, shard=state.shard).set(v)
        return dumps(
            {
                "event": "metrics",
                "shard": state.shard,
                "model_version": state.model_version,
                "position": state.position,
                "records": state.records_seen,
                **metrics,
                "ts": now,
            }
        )
