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

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from dataclasses import dataclass

from worker.codec import BadRecord, Decoder, dumps, encode_dead_letter, prediction_encoder
from worker.config import DistributionDriftSettings, Settings
from worker.learner import Learner, LearnerConfig, LearnResult, Request
from worker.models import spec_hash, uses_imputer
from worker.monitoring.drift import DistributionDrift
from worker.monitoring.quality import quality_for
from worker.monitoring.telemetry import Telemetry
from worker.records import Outputs
from worker.state import ShardState

log = logging.getLogger("worker.learning")


class Engine:
    """What every shard shares: the settings, the decoder, the telemetry, the spec hash."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None):
        self.settings = settings
        self.task = settings.model.task
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.spec = spec_hash(settings.model)
        #: the monitor settings a snapshot's metrics and detectors were built with (not in ``spec``:
        #: changing them keeps the model, see :meth:`refresh_monitors`)
        self.monitor_spec = hashlib.sha256(settings.monitor.model_dump_json().encode()).hexdigest()[:16]
        self.learner = LearnerConfig(settings)
        probe = self.learner.new_model()
        missing = settings.record.missing
        keep_missing = missing == "keep" or (missing == "auto" and uses_imputer(probe))
        self.decoder = Decoder(settings.record, settings.limits, self.task, keep_missing=keep_missing)

    def new_state(self, shard: str) -> ShardState:
        """A fresh state: an untrained model from the spec, empty metrics and detectors."""
        return ShardState(shard=shard, model=self.learner.new_model(), **self._monitors())

    def _monitors(self) -> dict[str, Any]:
        """Empty metrics and detectors, from the monitor settings."""
        m = self.settings.monitor
        return {
            "quality": quality_for(self.task, m.window),
            "concept": self.learner.new_concept_detector(),
            "data_drift": _distribution("data", m.drift.data),
            "prediction_drift": _distribution("prediction", m.drift.prediction),
        }

    def refresh_monitors(self, state: ShardState) -> bool:
        """A restored state whose metrics and detectors were built with other monitor settings
        gets fresh ones from these (its model stays); True if it did."""
        taken = state.extra.get("monitor")
        if taken is None or taken == self.monitor_spec:
            return False
        for name, value in self._monitors().items():
            setattr(state, name, value)
        state.extra["monitor"] = self.monitor_spec
        return True

    def shard(self, name: str, state: ShardState | None = None) -> Shard:
        return Shard(self, state if state is not None else self.new_state(name))


def _distribution(signal: str, d: DistributionDriftSettings) -> DistributionDrift | None:
    if not d.enabled:
        return None
    return DistributionDrift(
        signal, d.reference_size, d.warmup, d.window, d.check_every, d.test, d.threshold, d.bins, d.max_categories, d.max_features
    )


@dataclass
class Pending:
    """A batch between :meth:`Shard.begin` and :meth:`Shard.finish`: decoded, not yet learned."""

    out: Outputs
    records: list  #: (id, key, x, y, ts, position, original bytes) of the records to learn
    request: Request  #: what the learner is asked to do with them
    events: list | None  #: data-drift events of the batch (None: not watched yet)
    n_filtered: int
    last_position: int
    first_position: int
    now: float
    publish_from: int
    size: int
    seconds: float


class Shard:
    """One shard's processing: call :meth:`process` with its messages in source order.

    The runtime calls the two halves of :meth:`process` itself, :meth:`begin` and
    :meth:`finish`, with the learning step in between done by a learner host (possibly in
    another process, while this one begins the next batch).
    """

    def __init__(self, engine: Engine, state: ShardState):
        self.engine = engine
        self.state = state
        s = engine.settings
        self._learner: Learner | None = None  # for process(): the model runs here
        self._begun = state.position  # the position after the last batch begun
        self._every_records = s.monitor.every_records
        self._every_seconds = s.monitor.every_seconds
        self._freeze = s.monitor.drift.data.policy == "freeze"
        self._classification = engine.task == "classification"
        self._since_report = 0
        self._last_report = time.monotonic()
        self._key_field = s.record.key is not None
        task = engine.task
        extra_name = "proba" if task == "classification" and s.model.proba else "score" if task == "anomaly" else None
        self._encode = prediction_encoder(state.shard, extra_name)
        self._challenger = None if state.challenger is None else state.challenger.summary()
        tel = engine.telemetry
        self._c_learned = tel.records.labels(outcome="learned")
        self._c_predicted = tel.records.labels(outcome="predicted")
        self._c_filtered = tel.records.labels(outcome="filtered")
        self._c_dead = tel.records.labels(outcome="dead_letter")
        self._c_replayed = tel.records.labels(outcome="replayed")
        #: The version of the model behind the outputs finished last. The state's own
        #: ``model_version`` belongs to the learner, which may already be a batch ahead.
        self._version = state.model_version
        tel.model_version.labels(shard=state.shard).set(self._version)

    def process(
        self,
        values: Sequence[bytes],
        positions: Sequence[int],
        now: float | None = None,
        publish_from: int = 0,
        timestamps: Sequence[float | None] | None = None,
    ) -> Outputs:
        """Test-then-train over one batch, the model in this process; returns the encoded outputs.

        Records at positions below ``state.position`` were already learned and are skipped.
        Records at positions below ``publish_from`` are learned (replay) but publish nothing.
        The stages run one after the other over the batch: decode, data-drift watch, predict
        and learn (with concept drift and its policy per record), quality and prediction drift.
        """
        pending = self.begin(values, positions, now, publish_from, timestamps)
        if pending is None:
            return Outputs()
        if self._learner is None:
            self._learner = Learner(self.engine.learner, self.state)
        return self.finish(pending, self._learner.learn(*pending.request[1:]))

    def begin(
        self,
        values: Sequence[bytes],
        positions: Sequence[int],
        now: float | None = None,
        publish_from: int = 0,
        timestamps: Sequence[float | None] | None = None,
    ) -> Pending | None:
        """Decode the batch and watch its inputs; None when every record was processed before."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        skip_below = self._begun
        if not positions or positions[-1] < skip_below:
            return None
        out = Outputs()

        # 1. Codec: bytes -> (id, key, x, y, ts, position); bad records -> dead letters
        decode = self.engine.decoder.decode
        records: list = []
        add = records.append
        n_filtered = 0
        last_pos = first_pos = None
        labels = self._classification
        label_str = None if self.state.label_kind is None else self.state.label_kind == "string"
        for i, value in enumerate(values):
            pos = positions[i]
            if pos < skip_below:
                continue
            if first_pos is None:
                first_pos = pos
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
            if labels and y is not None and (type(y) is str) is not label_str:
                if label_str is None:  # the shard's first label decides the kind of them all
                    label_str = type(y) is str
                    self.state.label_kind = "string" if label_str else "number"
                else:
                    self._dead(out.dead_letters, value, "invalid_target", _mixed_label(y, label_str), pos, now,
                               publish_from)
                    continue
            if ts is None and timestamps is not None:
                ts = timestamps[i]
            add((rid, key, x, y, ts, pos, value))
        self._begun = last_pos + 1

        # 2. Data drift: with the freeze policy the batch is watched now (learning stops from the
        #    record after an alarm); otherwise in finish(), so that begin() changes no state that
        #    a snapshot holds (the runtime snapshots between begin() and the next finish()).
        events, frozen = self._watch_inputs(records) if self._freeze else (None, None)
        request = (self.state.shard, [r[2] for r in records], [r[3] for r in records],
                   [r[0] for r in records], [r[5] for r in records], frozen)
        return Pending(out, records, request, events, n_filtered, last_pos, first_pos, now, publish_from, len(values),
                       time.perf_counter() - started)

    def _watch_inputs(self, records: list) -> tuple[list, list[bool] | None]:
        """Feed the data-drift watch: (its events, which records must not be learned or None).

        An alarm raised at a record freezes learning from the next record on; learning resumes
        after the record at which the last alarm clears.
        """
        dd = self.state.data_drift
        if dd is None or not records:
            return [], None
        events = dd.update_many([r[2] for r in records], [r[0] for r in records], [r[5] for r in records])
        if not self._freeze:
            return events, None
        active = set(dd.alarms)
        for event in reversed(events):  # the alarms as they were before this batch
            (active.discard if event["event"] == "drift" else active.add)(event["feature"])
        if not active and not events:
            return events, None
        index = {r[5]: i for i, r in enumerate(records)}
        frozen = [bool(active)] * len(records)
        for event in events:
            (active.add if event["event"] == "drift" else active.discard)(event["feature"])
            start = index[event["position"]] + 1
            frozen[start:] = [bool(active)] * (len(records) - start)
        return events, frozen

    def finish(self, pending: Pending, result: LearnResult) -> Outputs:
        """Publishable outputs of a begun batch from what the learner made of it; the monitor's stages."""
        started = time.perf_counter()
        state = self.state
        out = pending.out
        now, publish_from = pending.now, pending.publish_from

        # 3. Outputs of the learner: predictions, refused records, concept-drift and policy events
        events = pending.events if pending.events is not None else self._watch_inputs(pending.records)[0]
        for event in events:  # (published with the version of the model that saw the batch)
            self._emit_drift(out, event, now, publish_from, result.version_before)
        n_pred, n_learn, labelled, outputs_all = self._predictions(out, pending, result)
        for event in result.events:  # (each carries the version it was raised under)
            self._emit_drift(out, event, now, publish_from)
        self._version = result.version
        self._challenger = result.challenger
        if result.changed:  # a new model: new prediction-drift reference
            state.prediction_drift = _distribution("prediction", self.engine.settings.monitor.drift.prediction)
            self.engine.telemetry.model_version.labels(shard=state.shard).set(self._version)

        # 4. Monitor: quality metrics, prediction drift, periodic report
        state.position = pending.last_position + 1
        n_done = n_pred + n_learn + pending.n_filtered
        state.records_seen += n_done
        outs, out_ids, out_pos = (list(c) for c in zip(*outputs_all)) if outputs_all else ([], [], [])
        if self.engine.task in ("clustering", "anomaly"):
            state.quality.update_many([], outs)
        elif labelled:
            ys, yp, probas = labelled
            state.quality.update_many(ys, yp, probas if self.engine.task == "classification" else None)
        if state.prediction_drift is not None and outs:
            for event in state.prediction_drift.update_many(outs, out_ids, out_pos):
                self._emit_drift(out, event, now, publish_from)
        if publish_from > 0 and pending.first_position < publish_from:
            self._c_replayed.inc(n_done)
        else:
            self._c_learned.inc(n_learn)
            self._c_predicted.inc(n_pred)
            self._c_filtered.inc(pending.n_filtered)
        self._since_report += n_done
        if self._since_report >= self._every_records or time.monotonic() - self._last_report >= self._every_seconds:
            report = self.report(now)
            if state.position > publish_from:
                out.metrics.append((None, report))
        tel = self.engine.telemetry
        tel.position.labels(shard=state.shard).set(state.position)
        tel.processing.observe(pending.seconds + result.seconds + time.perf_counter() - started)
        tel.batch_records.observe(pending.size)
        return out

    def _predictions(self, out: Outputs, pending: Pending, result: LearnResult) -> tuple[int, int, list | None, list]:
        """Encode a prediction per learned record; (predicted, learned, labelled, outputs) for the monitor,
        ``labelled`` as the columns [targets, predictions, extras] (None if no record had a target)."""
        now, publish_from = pending.now, pending.publish_from
        predictions = out.predictions
        key_field = self._key_field
        encode = self._encode
        score_task = self.engine.task in ("clustering", "anomaly")
        want_outputs = score_task or self.state.prediction_drift is not None
        preds, extras, errors = result.labels(), result.extras, result.errors
        versions = result.versions
        version = result.version_before
        concept = None if self.engine.learner.owns_concept else self.state.concept
        regression = self.engine.task == "regression"
        labelled: list = []
        add_labelled = labelled.append
        watched: list[int] = []  # the records fed to the concept watch, by index
        add_watched = watched.append
        outputs_all: list = []
        add_output = outputs_all.append
        n_pred = n_learn = 0
        for i, (rid, key, _, y, ts, pos, value) in enumerate(pending.records):
            if errors is not None and i in errors:
                self._dead(out.dead_letters, value, "model_error", errors[i], pos, now, publish_from)
                continue
            pred = preds[i]
            extra = extras[i]
            if pos >= publish_from:
                if versions is not None:
                    version = versions[i]
                predictions.append((str(key).encode() if key_field and key is not None else None,
                                    encode(rid, key, pred, extra, version, pos, now if ts is None else ts)))
            if want_outputs:
                add_output((pred if extra is None or not score_task else extra, rid, pos))
            if score_task:
                n_learn += 1
            elif y is not None:
                add_labelled((y, pred, extra))
                n_learn += 1
                if concept is not None:
                    add_watched(i)
            else:
                n_pred += 1
        columns = [list(c) for c in zip(*labelled)] if labelled else None  # ys, predictions, extras
        if concept is not None and columns:  # (alert policy: the error stream is watched here)
            records = pending.records
            for j, event in concept.observe_many(columns[0], columns[1], regression, lambda j: records[watched[j]]):
                i = watched[j]
                self._emit_drift(out, event, now, publish_from, result.version_before if versions is None else versions[i])
        return n_pred, n_learn, columns, outputs_all

    # -- outputs ---------------------------------------------------------------------------
    def _dead(self, out: list, value: bytes, reason: str, detail: str, pos: int, now: float, publish_from: int) -> None:
        self._c_dead.inc()
        if pos >= publish_from:
            self.engine.telemetry.dead_letters.labels(reason=reason).inc()
            out.append((None, encode_dead_letter(value, reason, detail, self.state.shard, pos, now)))

    def _emit_drift(self, out: Outputs, event: dict, now: float, publish_from: int, version: int | None = None) -> None:
        """A drift-output event (drift, drift_cleared, model_reset, challenger_*, promotion).

        Its ``model_version`` is the event's own, else ``version``, else that of the last batch finished.
        """
        if event["position"] < publish_from:
            return
        state = self.state
        if event["event"] == "drift":
            self.engine.telemetry.drift_events.labels(
                signal=event["signal"], detector=event["detector"], shard=state.shard
            ).inc()
        version = event.get("model_version", self._version if version is None else version)
        out.drift.append((None, dumps({**event, "shard": state.shard, "model_version": version, "ts": now})))

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
        return dumps(
            {
                "event": "metrics",
                "shard": state.shard,
                "model_version": self._version,
                "position": state.position,
                "records": state.records_seen,
                **metrics,
                "drift": drift,
                "challenger": self._challenger,
                "ts": now,
            }
        )


def _mixed_label(y: Any, expected_string: bool) -> str:
    """The detail of a label whose kind differs from the shard's first label."""
    got, want = ("a number", "strings") if expected_string else ("a string", "numbers (integers or booleans)")
    return f"the label {y!r} is {got}; this shard's labels are {want} (the first label decides)"
