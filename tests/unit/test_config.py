"""worker.config: YAML, environment overrides, validation naming the key, masking, round trips."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.__main__ import main
from worker.config import DriftSettings, Settings, apply_env, dump_settings, load_settings
from worker.errors import ConfigError, ModelSpecError

def concept_drift(spec) -> dict:
    """``monitor.drift`` with this concept detector (the settings moved under ``concept`` in the drift issue)."""
    return {"concept": {"detector": spec}} if "concept" in DriftSettings.model_fields else {"detector": spec}


KAFKA = {"type": "kafka", "kafka": {"bootstrap_servers": "localhost:9092", "topics": ["events"]}}


def write(tmp_path, text: str):
    p = tmp_path / "worker.yaml"
    p.write_text(text)
    return p


# -- loading ------------------------------------------------------------------------------


def test_yaml_file_is_loaded_into_frozen_settings(tmp_path):
    p = write(
        tmp_path,
        """
source: {type: file, file: {path: events.jsonl}}
outputs: {predictions: out/p.jsonl, drift: out/d.jsonl, metrics: out/m.jsonl, dead_letter: out/dl.jsonl}
record: {id: id, key: user, features: x, target: y, timestamp: ts}
model:
  task: classification
  pipeline:
    - preprocessing.StandardScaler: {}
    - linear_model.LogisticRegression: {optimizer: {optim.SGD: {lr: 0.05}}}
checkpoint: {store: "file:///tmp/state", every_records: 10000, every_seconds: 30}
telemetry: {port: 9108}
""",
    )
    s = load_settings(p, env={})
    assert isinstance(s, Settings)
    assert s.source.file.path == "events.jsonl"
    assert s.outputs.dead_letter == "out/dl.jsonl"
    assert s.record.key == "user" and s.record.timestamp == "ts"
    assert s.model.pipeline[1] == {"linear_model.LogisticRegression": {"optimizer": {"optim.SGD": {"lr": 0.05}}}}
    assert s.checkpoint.store == "file:///tmp/state"
    assert s.telemetry.port == 9108
    with pytest.raises(Exception):  # frozen
        s.telemetry.port = 1  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path):
    assert load_settings(write(tmp_path, ""), env={}) == Settings()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("a: [unclosed", "not valid YAML"), ("- just\n- a list\n", "mapping")],
)
def test_unreadable_files_are_config_errors(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(write(tmp_path, text), env={})


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_a_directory_or_a_non_utf8_file_is_a_config_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"telemetry: {host: caf\xe9\xff}\n")
    for path in (tmp_path, bad):
        with pytest.raises(ConfigError, match="cannot read config file") as e:
            load_settings(path, env={})
        assert str(path) in str(e.value)
        assert main(["check", "--config", str(path)]) == 2
        assert str(path) in capsys.readouterr().err


# -- environment ---------------------------------------------------------------------------


def test_env_overrides_nested_keys_with_yaml_typed_values():
    s = load_settings(
        data={"telemetry": {"port": 9108}},
        env={
            "WORKER__TELEMETRY__PORT": "0",
            "WORKER__SOURCE__FILE__FOLLOW": "true",
            "WORKER__SOURCE__FILE__PATH": "in.jsonl",
            "WORKER__RECORD__FEATURES": "[a, b, c]",
            "WORKER__MONITOR__WINDOW": "50",
            "WORKER__MODEL__PIPELINE": "[{linear_model.PAClassifier: {C: 0.5}}]",
            "WORKER__OUTPUTS__DRIFT": "",  # empty = null
            "OTHER__TELEMETRY__PORT": "1",  # not ours
        },
    )
    assert s.telemetry.port == 0
    assert s.source.file.follow is True and s.source.file.path == "in.jsonl"
    assert s.record.features == ["a", "b", "c"]
    assert s.monitor.window == 50
    assert s.model.pipeline == [{"linear_model.PAClassifier": {"C": 0.5}}]
    assert s.outputs.drift is None


def test_env_names_are_case_insensitive_below_the_prefix():
    assert load_settings(data={}, env={"WORKER__telemetry__Port": "7"}).telemetry.port == 7


def test_env_does_not_mutate_the_yaml_data():
    data = {"telemetry": {"port": 1}}
    apply_env(data, {"WORKER__TELEMETRY__PORT": "2"})
    assert data == {"telemetry": {"port": 1}}


def test_env_config_dict_keys_map_to_dotted_librdkafka_names():
    s = load_settings(
        data={"source": KAFKA},
        env={
            "WORKER__SOURCE__KAFKA__CONFIG__SASL_MECHANISM": "PLAIN",
            "WORKER__SOURCE__KAFKA__CONFIG__ENABLE_IDEMPOTENCE": "true",
            "WORKER__SOURCE__KAFKA__CONFIG__SESSION_TIMEOUT_MS": "45000",
            "WORKER__SOURCE__KAFKA__TOPICS": "[a, b]",
        },
    )
    assert s.source.kafka.config == {"sasl.mechanism": "PLAIN", "enable.idempotence": True, "session.timeout.ms": 45000}
    assert s.source.kafka.topics == ["a", "b"]


def test_env_consumer_and_producer_keys_map_to_dotted_librdkafka_names_too():
    s = load_settings(
        data={"source": KAFKA},
        env={"WORKER__SOURCE__KAFKA__CONSUMER__AUTO_OFFSET_RESET": "earliest",
             "WORKER__SOURCE__KAFKA__PRODUCER__LINGER_MS": "5"},
    )
    assert s.source.kafka.consumer == {"auto.offset.reset": "earliest"}
    assert s.source.kafka.producer == {"linger.ms": 5}


def test_env_override_with_a_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as e:
        load_settings(data={}, env={"WORKER__TELEMETRY__PORT": "lots"})
    assert e.value.key == "telemetry.port"


@pytest.mark.parametrize("secret", ["007", "12345", "yes", "0x1F"])
def test_secrets_from_env_are_taken_verbatim(secret):
    s = load_settings(
        data={"source": KAFKA},
        env={"WORKER__SOURCE__KAFKA__CONFIG__SASL_PASSWORD": secret, "WORKER__CHECKPOINT__HMAC_KEY": secret},
    )
    assert s.source.kafka.config["sasl.password"] == secret
    assert s.checkpoint.hmac_key.get_secret_value() == secret


def test_env_override_that_yaml_reads_as_a_date_is_not_dropped():
    s = load_settings(data={"source": {"file": {"path": "a.jsonl"}}}, env={"WORKER__SOURCE__FILE__PATH": "2024-01-01"})
    assert s.source.file.path == "2024-01-01"


# -- validation names the key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"modle": {}}, "modle"),
        ({"telemetry": {"prot": 1}}, "telemetry.prot"),
        ({"telemetry": {"port": "abc"}}, "telemetry.port"),
        ({"telemetry": {"port": 70000}}, "telemetry.port"),
        ({"telemetry": {"port": True}}, "telemetry.port"),
        ({"telemetry": {"log_level": "LOUD"}}, "telemetry.log_level"),
        ({"checkpoint": {"store": "s3://bucket"}}, "checkpoint.store"),
        ({"checkpoint": {"every_records": 0}}, "checkpoint.every_records"),
        ({"checkpoint": {"hmac_key": 5}}, "checkpoint.hmac_key"),
        ({"checkpoint": {"hmac_key": ""}}, "checkpoint.hmac_key"),
        ({"checkpoint": {"store": "file://"}}, "checkpoint.store"),
        ({"checkpoint": {"store": "file://relative/dir"}}, "checkpoint.store"),
        ({"checkpoint": {"store": "kafka://"}}, "checkpoint.store"),
        ({"checkpoint": {"store": "kafka://snapshots"}}, "checkpoint.store"),  # with the file source
        ({"limits": {"max_record_bytes": 10}}, "limits.max_record_bytes"),
        ({"monitor": {"every_seconds": 0}}, "monitor.every_seconds"),
        ({"model": {"task": "ranking"}}, "model.task"),
        ({"model": {"pipeline": []}}, "model.pipeline"),
        ({"record": {"features": []}}, "record.features"),
        ({"record": {"missing": "maybe"}}, "record.missing"),
        ({"record": {"drop_if": [{"field": "a", "op": "like"}]}}, "record.drop_if.0.op"),
        ({"record": {"drop_if": [{"field": "a", "op": "in", "value": 3}]}}, "record.drop_if.0.value"),
        ({"record": {"drop_if": [{"field": "a", "op": "not_in", "value": "testing"}]}}, "record.drop_if.0.value"),
        ({"record": {"drop_if": [{"field": "a", "op": "in"}]}}, "record.drop_if.0.value"),
        ({"delivery": "at_most_once"}, "delivery"),
        ({"source": {"type": "kafka"}}, "source"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        load_settings(data=data, env={})
    assert e.value.key == key
    assert str(e.value).startswith(key)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        (
            {"pipeline": [{"preprocessing.StandardScaler": {}}, {"linear_model.Nope": {}}]},
            "model.pipeline[1].linear_model.Nope",
        ),
        (
            {"pipeline": [{"linear_model.LogisticRegression": {"optimizer": {"optim.Nope": {"lr": 1}}}}]},
            "model.pipeline[0].linear_model.LogisticRegression.optimizer.optim.Nope",
        ),
        ({"pipeline": [{"linear_model.LogisticRegression": {"bogus": 1}}]}, "model.pipeline[0].linear_model.LogisticRegression"),
        ({"pipeline": [{"os.system": "true"}]}, "model.pipeline[0].os.system"),
        ({"task": "regression", "pipeline": [{"naive_bayes.GaussianNB": {}}]}, "model.pipeline"),
    ],
)
def test_bad_model_spec_names_its_key_path(model, key):
    with pytest.raises(ModelSpecError) as e:
        load_settings(data={"model": model}, env={})
    assert e.value.key == key


def test_bad_drift_detector_spec_names_its_key():
    with pytest.raises(ConfigError) as e:
        load_settings(data={"monitor": {"drift": concept_drift({"drift.Nope": {}})}}, env={})
    assert e.value.key.startswith("monitor.drift.") and e.value.key.endswith("detector.drift.Nope")


def test_an_empty_hmac_key_from_the_environment_is_refused():
    with pytest.raises(ConfigError) as e:
        load_settings(data={}, env={"WORKER__CHECKPOINT__HMAC_KEY": ""})
    assert e.value.key == "checkpoint.hmac_key" and "empty" in str(e.value)


def test_a_kafka_checkpoint_store_needs_the_kafka_source_and_a_file_store_an_absolute_path():
    assert load_settings(data={"source": KAFKA, "checkpoint": {"store": "kafka://snapshots"}}, env={})
    assert load_settings(data={"checkpoint": {"store": "file:///var/lib/worker"}}, env={})
    with pytest.raises(ConfigError, match="source.type: kafka") as e:
        load_settings(data={"checkpoint": {"store": "kafka://snapshots"}}, env={})
    assert e.value.key == "checkpoint.store"


@pytest.mark.parametrize(
    ("task", "spec", "fragment"),
    [
        ("classification", {"linear_model.LogisticRegression": {}}, "not a river drift detector"),
        ("classification", {"preprocessing.StandardScaler": {}}, "not a river drift detector"),
        ("regression", {"drift.binary.DDM": {}}, "classification only"),
        ("regression", {"drift.binary.HDDMA": {}}, "classification only"),
    ],
)
def test_a_concept_detector_must_be_a_drift_detector_fit_for_the_task(task, spec, fragment):
    pipeline = [{"linear_model.LinearRegression" if task == "regression" else "linear_model.LogisticRegression": {}}]
    with pytest.raises(ConfigError, match=fragment) as e:
        load_settings(data={"model": {"task": task, "pipeline": pipeline}, "monitor": {"drift": concept_drift(spec)}},
                      env={})
    assert e.value.key == "monitor.drift.concept.detector"


@pytest.mark.parametrize("spec", [{"drift.binary.DDM": {}}, {"drift.binary.EDDM": {}}, {"drift.binary.HDDMW": {}},
                                  {"drift.binary.FHDDM": {}}, {"drift.KSWIN": {"seed": 1}}, {"drift.NoDrift": {}}])
def test_river_drift_detectors_are_accepted_for_classification(spec):
    assert load_settings(data={"monitor": {"drift": concept_drift(spec)}}, env={}).monitor.drift.concept.detector == spec


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as e:
        load_settings(data={"telemetry": {"port": -1}, "limits": {"batch_size": 0, "polls_in_flight": 0}}, env={})
    assert all(k in str(e.value) for k in ("telemetry.port", "limits.batch_size", "limits.polls_in_flight"))


# -- worker check ----------------------------------------------------------------------------


def test_check_prints_resolved_settings_with_secrets_masked(tmp_path, capsys, monkeypatch):
    p = write(
        tmp_path,
        """
source:
  type: kafka
  kafka: {bootstrap_servers: "b:9092", topics: [t], config: {sasl.username: alice, sasl.password: hunter2}}
checkpoint: {store: "file:///tmp/x", hmac_key: s3cr3t-hmac}
""",
    )
    monkeypatch.setenv("WORKER__SOURCE__KAFKA__CONFIG__SSL_KEY_PASSWORD", "pem-pass")
    assert main(["check", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    for secret in ("hunter2", "s3cr3t-hmac", "pem-pass"):
        assert secret not in out
    shown = yaml.safe_load(out)
    assert shown["source"]["kafka"]["config"]["sasl.password"] == "**********"
    assert shown["source"]["kafka"]["config"]["ssl.key.password"] == "**********"
    assert shown["source"]["kafka"]["config"]["sasl.username"] == "alice"
    assert shown["checkpoint"]["hmac_key"] == "**********"
    assert shown["checkpoint"]["store"] == "file:///tmp/x"
    assert "configuration OK" in out


def test_check_with_a_bad_key_exits_2_naming_it(tmp_path, capsys):
    p = write(tmp_path, "telemetry: {port: high}\n")
    assert main(["check", "--config", str(p)]) == 2
    assert "telemetry.port" in capsys.readouterr().err


# -- hypothesis ------------------------------------------------------------------------------

names = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=8)
paths = st.lists(names, min_size=1, max_size=3).map(".".join)
texts = st.text(max_size=20)
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | texts
PIPELINES = {
    "classification": [
        [{"linear_model.LogisticRegression": {}}],
        [{"preprocessing.StandardScaler": {}}, {"tree.HoeffdingTreeClassifier": {"grace_period": 20}}],
        [{"neighbors.KNNClassifier": {"engine": {"neighbors.LazySearch": {"dist_func": "manhattan"}}}}],
    ],
    "regression": [[{"linear_model.LinearRegression": {"optimizer": {"optim.Adam": {"lr": 0.01}}}}]],
    "clustering": [[{"cluster.KMeans": {"n_clusters": 3, "seed": 1}}]],
    "anomaly": [[{"preprocessing.MinMaxScaler": {}}, {"anomaly.HalfSpaceTrees": {"seed": 2}}]],
}


OPS = ["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "missing", "present"]


@st.composite
def valid_settings(draw) -> dict:
    task = draw(st.sampled_from(sorted(PIPELINES)))
    opt = lambda s: st.none() | s  # noqa: E731
    pos_float = st.floats(min_value=1e-6, max_value=1e6)
    data = {
        "source": {"type": "file", "file": {"path": draw(texts.filter(bool)), "follow": draw(st.booleans()),
                                             "poll_seconds": draw(pos_float)}},
        "outputs": {k: draw(opt(texts)) for k in ("predictions", "drift", "metrics", "dead_letter")},
        "record": {
            "id": draw(opt(paths)),
            "key": draw(opt(paths)),
            "features": draw(paths | st.lists(names, min_size=1, max_size=4)),
            "target": draw(opt(paths)),
            "timestamp": draw(opt(paths)),
            "missing": draw(st.sampled_from(["auto", "keep", "drop"])),
            "drop_if": draw(st.lists(st.sampled_from(OPS).flatmap(lambda op: st.fixed_dictionaries({
                "field": paths,
                "op": st.just(op),
                "value": st.lists(scalars, max_size=3) if op in ("in", "not_in") else scalars | st.lists(scalars, max_size=3),
            })), max_size=3)),
        },
        "model": {"task": task, "pipeline": draw(st.sampled_from(PIPELINES[task])), "proba": draw(st.booleans()),
                  "anomaly_threshold": draw(opt(st.floats(allow_nan=False)))},
        "monitor": {"every_records": draw(st.integers(1, 10**9)), "every_seconds": draw(pos_float),
                    "window": draw(st.integers(1, 10**6)),
                    "drift": concept_drift(draw(st.sampled_from([None, {"drift.ADWIN": {"delta": 0.01}}, {"drift.PageHinkley": {}}])))},
        "checkpoint": {"store": draw(opt(names.map(lambda n: f"file:///tmp/{n}"))), "every_records": draw(st.integers(1, 10**9)),
                       "every_seconds": draw(pos_float)},
        "telemetry": {"port": draw(opt(st.integers(0, 65535))), "host": draw(st.sampled_from(["0.0.0.0", "127.0.0.1", "::"])),
                      "log_level": draw(st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR"])),
                      "log_format": draw(st.sampled_from(["text", "json"]))},
        "limits": {"max_record_bytes": draw(st.integers(64, 2**31)), "max_features": draw(st.integers(1, 10**6)),
                   "batch_size": draw(st.integers(1, 10**5))},
        "delivery": draw(st.sampled_from(["exactly_once", "at_least_once"])),
    }
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_settings())
def test_dump_then_load_round_trips(data):
    s = load_settings(data=data, env={})
    again = load_settings(data=yaml.safe_load(dump_settings(s)), env={})
    assert again == s


TOP_KEYS = ["source", "outputs", "record", "model", "monitor", "checkpoint", "telemetry", "limits", "delivery"]
SUB_KEYS = ["type", "file", "kafka", "path", "port", "pipeline", "task", "features", "drop_if", "store", "detector",
            "drift", "selection", "grid", "strategy", "hmac_key", "every_records", "window", "missing", "op", "field"]
CLASSES = ["linear_model.LogisticRegression", "linear_model.LinearRegression", "optim.SGD", "tree.HoeffdingTreeClassifier",
           "preprocessing.StatImputer", "neighbors.KNNClassifier", "neighbors.LazySearch", "drift.ADWIN",
           "compat.SKL2RiverClassifier", "sklearn.linear_model.SGDClassifier", "model_selection.BanditClassifier",
           "compose.Select", "os.system", "builtins.eval", "river.utils.math.minkowski_distance"]
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(TOP_KEYS + SUB_KEYS + CLASSES) | texts, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(TOP_KEYS) | texts, junk, max_size=4))
def test_junk_configuration_raises_only_config_error(data):
    try:
        load_settings(data=data, env={})
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.dictionaries(st.sampled_from(CLASSES), junk, min_size=1, max_size=1), min_size=1, max_size=3),
    st.sampled_from(["classification", "regression", "clustering", "anomaly"]),
)
def test_junk_model_specs_raise_only_config_error(pipeline, task):
    try:
        load_settings(data={"model": {"task": task, "pipeline": pipeline}}, env={})
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.lists(st.sampled_from(TOP_KEYS + SUB_KEYS) | names, min_size=1, max_size=4).map(
    lambda p: "WORKER__" + "__".join(p).upper()), st.text(max_size=30), max_size=4))
def test_junk_environment_raises_only_config_error(env):
    try:
        load_settings(data={}, env=env)
    except ConfigError:
        pass


def test_a_telemetry_port_in_use_stops_start_up_naming_the_key(tmp_path, capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    data = tmp_path / "in.jsonl"
    data.write_text('{"x": {"a": 1.0}, "y": 1}\n')
    cfg = write(tmp_path, f"source: {{type: file, file: {{path: {data}}}}}\n"
                          f"telemetry: {{host: 127.0.0.1, port: {taken.getsockname()[1]}}}\nlearner: inline\n")
    try:
        assert main(["run", "--config", str(cfg)]) == 2
    finally:
        taken.close()
    assert "telemetry.port" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["produce", "-b", "x:1", "-t", "t", "-n", "-5"], ["demo", "--records", "0"],
                                  ["produce", "-b", "x:1", "-t", "t", "--rate", "0"]])
def test_counts_and_rates_on_the_command_line_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_rabbitmq_refuses_exactly_once_and_a_prefetch_below_the_snapshot_interval(tmp_path):
    data = yaml.safe_load(f"""
source: {{type: rabbitmq, rabbitmq: {{url: "amqp://u:secret@127.0.0.1:1/%2F", exchange: ev, prefetch: 5000}}}}
checkpoint: {{store: "file://{tmp_path}"}}
""")
    with pytest.raises(ConfigError) as exc:
        load_settings(data=data, env={})
    assert exc.value.key == "delivery"
    with pytest.raises(ConfigError) as exc:
        load_settings(data={**data, "delivery": "at_least_once"}, env={})
    assert exc.value.key == "source.rabbitmq.prefetch"
