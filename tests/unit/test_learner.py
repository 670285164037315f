"""The learner hosts: the child process gives what the inline learner gives; snapshots taken
between polls hold the state at their position; a dead child is an error, not a hang."""

from __future__ import annotations

import os
import signal

import orjson
import pytest
from river import datasets, linear_model

from worker.checkpoint import FileStore
from worker.config import load_settings
from worker.learner import InlineLearners, Learner, LearnerConfig, LearnerError, ProcessLearners
from worker.learning import Engine
from worker.policies import Challenger
from worker.runtime import Runtime
from worker.state import ShardState, join_learner, loads_snapshot
from worker.transports.file import FileSink, FileSource

TREE = [{"tree.HoeffdingAdaptiveTreeClassifier": {"seed": 1}}]
LINEAR = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]


def drifting(n: int, change_at: int) -> list[tuple[dict, int]]:
    first = iter(datasets.synth.Agrawal(classification_function=0, seed=7))
    second = iter(datasets.synth.Agrawal(classification_function=2, seed=8))
    return [(x, int(y)) for x, y in (next(first) if i < change_at else next(second) for i in range(n))]


def settings(pipeline=TREE, drift: dict | None = None, **extra):
    return load_settings(data={"model": {"pipeline": pipeline}, "monitor": {"drift": drift or {}}, **extra}, env={})


@pytest.mark.parametrize("policy", ["reset", "challenger"])
def test_the_learner_process_gives_what_the_inline_learner_gives(policy):
    s = settings(drift={"concept": {"policy": policy},
                        "challenger": {"window": 300, "min_records": 300, "margin": 0.02}})
    records = drifting(9_000, 3_000)
    results = {}
    for host in (InlineLearners(LearnerConfig(s)), ProcessLearners(LearnerConfig(s))):
        engine = Engine(s)
        host.load(engine.new_state("s"))
        got = []
        for start in range(0, len(records), 700):
            chunk = records[start : start + 700]
            positions = list(range(start, start + len(chunk)))
            host.submit([("s", [x for x, _ in chunk], [y for _, y in chunk], positions, positions, None)])
            if host.pending > 2:  # three in flight at most
                got += host.collect()
        while host.pending:
            got += host.collect()
        host.close()
        results[type(host).__name__] = [
            (r.preds, r.extras, r.versions, r.version_before, r.version, r.events, r.changed, r.challenger) for r in got
        ]
    inline, process = results["InlineLearners"], results["ProcessLearners"]
    assert process == inline
    assert any(r[5] for r in inline), "the policy never acted"
    assert inline[-1][4] > 1, "the model was never replaced"


def write_input(path, n: int, bad_every: int = 997) -> None:
    with open(path, "wb") as f:
        for i, (x, y) in enumerate(drifting(n, n // 2)):
            line = b'{"id": %d, "x": {"a": NaN}}' % i if i % bad_every == 5 else orjson.dumps(
                {"id": i, "ts": float(i), "x": x, "y": y})
            f.write(line + b"\n")


class Recording(FileStore):
    """A file store that also keeps every snapshot it was given."""

    def __init__(self, directory):
        super().__init__(directory)
        self.saved: list[bytes] = []

    def save(self, shard: str, blob: bytes) -> None:
        self.saved.append(blob)
        super().save(shard, blob)


def run_worker(tmp_path, tag: str, s, data, learners=None) -> tuple[dict, Recording]:
    out = tmp_path / tag
    out.mkdir()
    paths = {k: str(out / f"{k}.jsonl") for k in ("predictions", "drift", "metrics", "dead_letter")}
    store = Recording(out / "state")
    engine = Engine(s)
    runtime = Runtime(engine, FileSource(str(data)), FileSink(paths), store, learners=learners)
    assert engine.telemetry.learner_pid == runtime.learners.pid  # (None inline)
    runtime.run()
    (shard,) = runtime.shards  # its last snapshot's size, as written
    assert engine.telemetry.registry.get_sample_value("worker_snapshot_bytes", {"shard": shard}) == len(store.saved[-1])
    outputs = {}
    for kind, p in paths.items():
        rows = [orjson.loads(line) for line in open(p, "rb")]
        if kind != "predictions":  # (their ts is the wall clock; predictions carry the record's)
            for row in rows:
                row.pop("ts", None)
        outputs[kind] = rows
    return outputs, store


DATA = {"reference_size": 500, "window": 500}


@pytest.mark.parametrize("drift", [
    {"data": {"policy": "alert", **DATA}},
    {"data": {"policy": "freeze", **DATA}},
    {"data": DATA, "concept": {"policy": "reset", "detector": {"drift.ADWIN": {"delta": 0.01}}}},
], ids=["alert", "freeze", "reset"])
def test_outputs_and_snapshots_do_not_depend_on_where_the_model_learns(tmp_path, drift, late_learners):
    """With snapshots every 700 records over 200-record polls, each snapshot between polls
    (overlapped with learning, or drained under the freeze policy) equals the state of a
    plain shard that processed exactly the records before its position, also when three
    polls are in flight and each is published only when it must be; under the reset policy
    the model versions of the outputs are the same too."""
    data = tmp_path / "in.jsonl"
    write_input(data, 6_000)
    common = dict(pipeline=LINEAR, drift=drift,
                  record={"timestamp": "ts"}, limits={"batch_size": 200},
                  checkpoint={"store": "file:///unused", "every_records": 700, "every_seconds": 3600})
    runs = {mode: run_worker(tmp_path, mode, settings(learner=mode, **common), data) for mode in ("inline", "process")}
    late = settings(**{**common, "limits": {"batch_size": 200, "polls_in_flight": 3}})
    runs["late"] = run_worker(tmp_path, "late", late, data, late_learners(LearnerConfig(late)))
    (inline, inline_store), (process, process_store) = runs["inline"], runs["process"]
    assert process == inline
    assert runs["late"][0] == inline
    assert len(inline["predictions"]) == 6_000 - len(inline["dead_letter"]) and inline["dead_letter"]
    if "concept" in drift:
        assert any(e["event"] == "model_reset" for e in inline["drift"]), "no reset happened"
        assert inline["predictions"][-1]["model_version"] > 1

    lines = data.read_bytes().splitlines()
    spec = Engine(settings(**common)).spec
    probe = {"salary": 50_000.0, "commission": 0.0, "age": 40, "elevel": 2, "car": 3, "zipcode": 1,
             "hvalue": 100_000.0, "hyears": 10, "loan": 200_000.0}
    for store in (inline_store, process_store, runs["late"][1]):
        states = [loads_snapshot(blob, spec) for blob in store.saved]
        between = [st for st in states if 0 < st.position < 6_000]
        assert len(between) >= 6, "no snapshots were taken between polls"
        gaps = [b.position - a.position for a, b in zip(between, between[1:])]
        assert min(gaps) >= 700, f"a checkpoint was taken twice: positions {[st.position for st in between]}"
        for st in between:
            ref = Engine(settings(**common)).shard("in")
            for start in range(0, st.position, 200):
                end = min(start + 200, st.position)
                ref.process(lines[start:end], list(range(start, end)), now=0.0)
            assert st.position == ref.state.position
            assert st.records_seen == ref.state.records_seen
            assert st.model_version == ref.state.model_version
            assert st.model.predict_proba_one(probe) == ref.state.model.predict_proba_one(probe)
            assert st.quality.report() == ref.state.quality.report()
            assert st.data_drift.statistics() == ref.state.data_drift.statistics()
            assert st.concept.detector.total == ref.state.concept.detector.total


class Fragile(linear_model.LogisticRegression):
    """A model that cannot learn a record with a feature ``boom`` (as a fresh tree overflowing on ±1e308)."""

    def learn_one(self, x, y):
        if "boom" in x:
            raise OverflowError("math range error")
        super().learn_one(x, y)


@pytest.mark.parametrize("pipeline", [LINEAR, TREE])
def test_with_no_policy_watching_the_learner_gives_what_a_plain_river_loop_gives(pipeline):
    """The lean path (no concept policy in the learner, no challenger, nothing frozen): the
    labels come back as the arg-max of the probabilities and are derived in the worker
    process; they, the probabilities and the refused records are those of a plain loop."""
    s = settings(pipeline=pipeline)  # (the default concept policy, alert, is watched by the worker process)
    config = LearnerConfig(s)
    learner = Learner(config, ShardState(shard="s", model=config.new_model(), concept=config.new_concept_detector()))
    records = drifting(3_000, 1_500)
    records[700] = ({**records[700][0], "salary": "high"}, records[700][1])  # refused by the model
    records[701] = (records[701][0], None)  # unlabelled: predicted, not learned
    model = config.new_model()
    expected_labels, expected_probas = [], []
    for x, y in records:
        try:
            proba, label = model.predict_proba_one(x), model.predict_one(x)
            if y is not None:
                model.learn_one(x, y)
        except TypeError:
            proba = label = None
        expected_labels.append(label)
        expected_probas.append(proba)
    labels, probas, errors = [], [], {}
    for start in range(0, len(records), 1_000):
        chunk = records[start : start + 1_000]
        positions = list(range(start, start + len(chunk)))
        result = learner.learn([x for x, _ in chunk], [y for _, y in chunk], positions, positions, None)
        assert result.preds is None and not result.events and result.versions is None  # the lean path was taken
        labels += result.labels()
        probas += result.extras
        errors.update({start + i: e for i, e in (result.errors or {}).items()})
    assert labels == expected_labels and probas == expected_probas
    assert list(errors) == [700] and errors[700].startswith("TypeError")


def test_a_challenger_that_fails_on_a_record_is_discarded_and_the_champion_goes_on():
    s = settings(pipeline=LINEAR, drift={"concept": {"policy": "challenger"}})
    config = LearnerConfig(s)
    state = ShardState(shard="s", model=config.new_model(), concept=config.new_concept_detector())
    state.challenger = Challenger(Fragile(), "classification", 0, s.monitor.drift.challenger)
    learner = Learner(config, state)
    xs = [{"a": 1.0}, {"a": 2.0, "boom": 1.0}, {"a": 3.0}]
    result = learner.learn(xs, [True, False, True], ["r0", "r1", "r2"], [10, 11, 12], None)
    assert result.errors is None and len(result.preds) == 3  # the champion predicted and learned every record
    assert state.challenger is None and result.challenger is None
    (event,) = result.events
    assert event["event"] == "challenger_discarded" and event["reason"] == "model_error"
    assert event["detail"] == "OverflowError: math range error"
    assert (event["record_id"], event["position"], event["challenger_records"], event["model_version"]) == ("r1", 11, 1, 1)
    assert state.model.predict_proba_one({"a": 3.0}) != config.new_model().predict_proba_one({"a": 3.0})


def test_a_dead_learner_process_is_an_error_not_a_hang():
    s = settings(pipeline=LINEAR)
    host = ProcessLearners(LearnerConfig(s))
    host.load(Engine(s).new_state("s"))
    host.submit([("s", [{"a": 1.0}], [1], [0], [0], None)])
    assert len(host.collect()) == 1  # a first answer came back
    os.kill(host._proc.pid, signal.SIGKILL)
    host._proc.join(5)
    with pytest.raises(LearnerError, match="died"):
        host.submit([("s", [{"a": 1.0}], [1], [1], [1], None)])
        host.collect()
    host.close()


def test_a_failing_learner_process_reports_its_traceback():
    s = settings(pipeline=LINEAR)
    host = ProcessLearners(LearnerConfig(s))
    host.submit([("nobody", [{"a": 1.0}], [1], [0], [0], None)])  # no learner for this shard
    with pytest.raises(LearnerError, match="KeyError"):
        host.collect()
    host.close()


def test_a_learner_process_that_failed_while_the_worker_sent_more_reports_its_traceback():
    """The usual pattern with polls in flight: the next request is sent after the child failed."""
    host = ProcessLearners(LearnerConfig(settings(pipeline=LINEAR)))
    host.submit([("nobody", [{"a": 1.0}], [1], [0], [0], None)])  # no learner for this shard
    host._proc.join(30)  # it failed and exited
    with pytest.raises(LearnerError, match="KeyError"):
        for _ in range(100):  # (the pipe takes a write or two before it tells that the reader is gone)
            host.submit([("nobody", [{"a": 1.0}], [1], [1], [1], None)])
    host.close()


def test_the_learner_process_ignores_sigterm_and_leaves_when_the_pipe_closes():
    host = ProcessLearners(LearnerConfig(settings(pipeline=LINEAR)))
    os.kill(host._proc.pid, signal.SIGTERM)  # what a terminal or a container runtime may send the group
    host.load(Engine(settings(pipeline=LINEAR)).new_state("s"))
    assert host.dump("s")  # still serving
    host.close()
    assert host._proc.exitcode == 0


def test_queued_requests_and_a_dump_between_them_are_answered_in_order():
    """Three polls queued, a dump asked for behind them, then two more: the learn results come
    back in order, and the dump holds the model as of the polls before it."""
    s = settings(pipeline=LINEAR)
    batches = [[{"a": float(i)} for i in range(k, k + 3)] for k in range(0, 15, 3)]
    probe = {"a": 2.5}
    answers = {}
    for host in (InlineLearners(LearnerConfig(s)), ProcessLearners(LearnerConfig(s))):
        state = Engine(s).new_state("s")
        host.load(state)
        assert not host.pending and not host.has_result()
        for xs in batches[:3]:
            host.submit([("s", xs, [1, 0, 1], [0, 1, 2], [0, 1, 2], None)])
        assert host.pending == 3
        blob = host.dump("s")
        model = state.model if blob is None else join_learner(ShardState(shard="s", model=None), blob).model
        after_three = model.predict_proba_one(probe)  # (inline: the live state, read now)
        for xs in batches[3:]:
            host.submit([("s", xs, [1, 0, 1], [0, 1, 2], [0, 1, 2], None)])
        got = []
        while host.pending:
            got.append(host.collect())
        assert [len(g) for g in got] == [1] * 5 and not host.has_result()
        answers[type(host).__name__] = ([r.extras for g in got for r in g], after_three)
        host.close()
    assert answers["ProcessLearners"] == answers["InlineLearners"]
    extras = answers["InlineLearners"][0]
    assert len({orjson.dumps(e, option=orjson.OPT_NON_STR_KEYS) for e in extras}) == 5
