"""The worker's configuration: one YAML file, overridable by environment variables.

Built once at start-up into one frozen :class:`Settings` object that is passed down;
nothing below this module reads the environment. A wrong key, type or value raises
:class:`~worker.errors.ConfigError` naming the key (the CLI exits with code 2).

>>> s = load_settings(data={"source": {"type": "file", "file": {"path": "in.jsonl"}}}, env={})
>>> s.model.task, s.record.features, s.checkpoint.every_records
('classification', 'x', 10000)
>>> load_settings(data={"modle": {}}, env={})
Traceback (most recent call last):
...
worker.errors.ConfigError: modle: unknown key
>>> s = load_settings(data={}, env={"WORKER__TELEMETRY__PORT": "0"})
>>> s.telemetry.port
0
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictInt, ValidationError, ValidationInfo, field_validator

from worker.errors import ConfigError

ENV_PREFIX = "WORKER__"
_SECRET_WORDS = ("password", "secret", "token", "key.pem", "private", "hmac_key", "sasl.oauthbearer")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSourceSettings(_Section):
    path: str = Field(description="JSON Lines file to read; '-' reads standard input.")
    follow: bool = Field(False, description="Keep reading as the file grows (like tail -f).")
    poll_seconds: float = Field(0.2, gt=0, description="With follow: how often to look for new lines.")


class KafkaSourceSettings(_Section):
    bootstrap_servers: str
    topics: list[str] = Field(min_length=1)
    group_id: str = "river-worker"
    config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Any librdkafka setting, passed through verbatim."
    )
    consumer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="librdkafka settings for the consumer only (over config)."
    )
    producer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="librdkafka settings for the producer only (over config)."
    )
    commit_every_ms: int = Field(
        100, ge=1, description="How often outputs and offsets are committed (one transaction each, exactly_once)."
    )
    transactional_id: str | None = Field(
        None,
        description="exactly_once: the producer's transactional.id; stable per replica, unique in the group "
        "(default: '<group_id>-<hostname>'). A restart with the same id aborts the previous incarnation's "
        "open transaction at once.",
    )


class RabbitMQSourceSettings(_Section):
    url: SecretStr = Field(description="AMQP URL, e.g. amqp://user:password@host:5672/%2F (a secret: masked).")
    exchange: str = Field(
        min_length=1, description="The x-consistent-hash exchange producers publish records to (routing key = record key)."
    )
    queue: str | None = Field(None, description="Prefix of the shard queues (default: the exchange's name).")
    shards: int = Field(4, ge=1, le=1024, description="Shard queues queue.0 .. queue.{shards-1}; one model each.")
    prefetch: int = Field(
        15000, ge=1,
        description="Unacknowledged deliveries per shard queue. With a checkpoint store acks wait for snapshots, "
        "so it must exceed checkpoint.every_records (plus the records in flight).",
    )
    declare: bool = Field(True, description="Declare the exchange, the shard queues and the output queues at start.")
    commit_every_ms: int = Field(
        200, ge=1, description="Without a checkpoint store: how often confirmed outputs are acked."
    )


class SourceSettings(_Section):
    type: Literal["file", "kafka", "rabbitmq"] = "file"
    file: FileSourceSettings | None = None
    kafka: KafkaSourceSettings | None = None
    rabbitmq: RabbitMQSourceSettings | None = None

    def model_post_init(self, __context: Any) -> None:
        if getattr(self, self.type) is None:
            raise ValueError(f"source.type is {self.type!r} but source.{self.type} is not set")


class OutputsSettings(_Section):
    """Where each output goes: a file path ('-' = stdout) or a topic/queue name; null disables."""

    predictions: str | None = "-"
    drift: str | None = None
    metrics: str | None = None
    dead_letter: str | None = None


class FilterRule(_Section):
    """Drop a record when ``field`` ``op`` ``value`` holds (e.g. ``{field: x.age, op: lt, value: 0}``)."""

    field: str
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "missing", "present"]
    value: Any = Field(None, validate_default=True)

    @field_validator("value")
    @classmethod
    def _list_for_in(cls, v: Any, info: ValidationInfo) -> Any:
        if info.data.get("op") in ("in", "not_in") and not isinstance(v, list):
            raise ValueError(f"op {info.data['op']} needs a list of values, got {v!r}")
        return v


class RecordSettings(_Section):
    """Field names (dotted paths) inside each JSON record."""

    id: str | None = "id"
    key: str | None = None
    features: str | list[str] = "x"
    target: str | None = "y"
    timestamp: str | None = None
    missing: Literal["auto", "keep", "drop"] = Field(
        "auto",
        description="Features whose value is null: drop the key (river's convention for a missing "
        "feature) or keep the None (for preprocessing.StatImputer); auto keeps them only when the "
        "pipeline has an imputer.",
    )
    drop_if: list[FilterRule] = Field(default_factory=list)

    @field_validator("features")
    @classmethod
    def _features_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("must name a field or a non-empty list of fields")
        return v


EstimatorSpec = dict[str, Any]


class SelectionSettings(_Section):
    """Model selection over a parameter grid (river.model_selection + utils.expand_param_grid)."""

    strategy: str = Field(description="A river model_selection class, e.g. model_selection.BanditClassifier")
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Any] = Field(description="Passed to utils.expand_param_grid over the pipeline.")


class ModelSettings(_Section):
    task: Literal["classification", "regression", "clustering", "anomaly"] = "classification"
    pipeline: list[EstimatorSpec] = Field(
        default_factory=lambda: [
            {"preprocessing.StandardScaler": {}},
            {"linear_model.LogisticRegression": {}},
        ],
        min_length=1,
    )
    selection: SelectionSettings | None = None
    proba: bool = Field(True, description="Classification: publish class probabilities.")
    anomaly_threshold: float | None = Field(
        None, description="Anomaly: when set, prediction = score >= threshold."
    )
    mini_batch: int = Field(
        0,
        ge=0,
        description="Opt-in: predict then learn groups of this many records at once with river's "
        "predict_many/learn_many (linear models, naive Bayes); 0 = record by record.",
    )


class ConceptDriftSettings(_Section):
    """Concept drift: a river.drift detector on the model's per-record error."""

    detector: EstimatorSpec | None = Field(
        default_factory=lambda: {"drift.ADWIN": {"delta": 0.001}},
        description="A river drift detector (drift.ADWIN, drift.PageHinkley, drift.KSWIN, ...; the binary-error "
        "drift.binary.DDM, EDDM, HDDMA, HDDMW, FHDDM for classification only); null disables concept drift.",
    )
    degradation_only: bool = Field(True, description="Alarm only when the error rises.")
    policy: Literal["alert", "reset", "challenger"] = "alert"


class DistributionDriftSettings(_Section):
    """Data drift (per input feature) or prediction drift (the output distribution)."""

    enabled: bool = True
    warmup: int = Field(0, ge=0, description="Records skipped before the reference starts (a young model's outputs move).")
    reference_size: int = Field(1000, ge=50, description="The N records after the warm-up form the reference.")
    window: int = Field(1000, ge=50, description="The current window compared with the reference.")
    check_every: int = Field(250, ge=1, description="Records between two tests.")
    test: Literal["psi", "ks"] = Field("psi", description="Numeric values: PSI over reference deciles, or KS.")
    threshold: float | None = Field(
        None, gt=0, description="Alarm above this statistic; default 0.25 for PSI, 0.2 for KS distance."
    )
    bins: int = Field(10, ge=2, le=100, description="Numeric values: quantile bins of the reference.")
    max_categories: int = Field(50, ge=2, description="Categorical values: the rest share one bucket.")
    max_features: int = Field(200, ge=1, description="At most this many features are watched.")
    policy: Literal["alert", "freeze"] = Field(
        "alert", description="freeze: stop learning while an alarm is active (predictions continue)."
    )


class ChallengerSettings(_Section):
    """The challenger policy: a fresh model trained in shadow from the drift point."""

    window: int = Field(500, ge=10, description="Rolling window on which champion and challenger are compared.")
    margin: float = Field(0.01, ge=0, description="Promote when the challenger is better by this much.")
    min_records: int = Field(300, ge=1, description="Labelled records before a promotion can happen.")
    max_records: int = Field(20000, ge=1, description="Give up on a challenger that has not won by then.")


class DriftSettings(_Section):
    concept: ConceptDriftSettings = Field(default_factory=ConceptDriftSettings)
    data: DistributionDriftSettings = Field(default_factory=DistributionDriftSettings)
    prediction: DistributionDriftSettings = Field(default_factory=lambda: DistributionDriftSettings(warmup=5000))
    challenger: ChallengerSettings = Field(default_factory=ChallengerSettings)

    def model_post_init(self, __context: Any) -> None:
        if self.prediction.policy == "freeze":
            raise ValueError("prediction.policy: freeze applies to data drift only")


class MonitorSettings(_Section):
    every_records: int = Field(1000, ge=1)
    every_seconds: float = Field(10.0, gt=0)
    window: int = Field(1000, ge=1, description="Size of the rolling window of metrics.")
    drift: DriftSettings = Field(default_factory=DriftSettings)


class CheckpointSettings(_Section):
    store: str | None = Field(None, description="file:///dir or kafka://topic; null disables checkpoints.")
    every_records: int = Field(10000, ge=1)
    every_seconds: float = Field(30.0, gt=0)
    hmac_key: SecretStr | None = Field(None, description="Signs and verifies snapshots.")

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("file://", "kafka://")):
            raise ValueError("must be file:///path or kafka://topic")
        if v is not None and v.startswith("file://") and not Path(v[len("file://") :]).is_absolute():
            raise ValueError(f"{v!r}: a file store needs an absolute directory, file:///path")
        if v == "kafka://":
            raise ValueError("a Kafka store needs a topic, kafka://topic")
        return v

    @field_validator("hmac_key")
    @classmethod
    def _hmac_key_not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            raise ValueError("is empty; an empty key would sign nothing: set one, or null to not sign snapshots")
        return v


class TelemetrySettings(_Section):
    port: StrictInt | None = Field(9108, ge=0, le=65535, description="0 = any free port; null disables.")
    host: str = "0.0.0.0"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"


class LimitsSettings(_Section):
    max_record_bytes: int = Field(1 << 20, ge=64)
    max_features: int = Field(10000, ge=1)
    batch_size: int = Field(500, ge=1, description="Records processed per batch.")
    polls_in_flight: int = Field(
        2, ge=1, le=16,
        description="Polls handed to the learners whose outputs are not published yet. With more than one, "
        "the learner process has the next poll queued while this process publishes; under load each one "
        "adds about a poll's processing time to the latency.",
    )


class Settings(_Section):
    source: SourceSettings = Field(default_factory=lambda: SourceSettings(file=FileSourceSettings(path="-")))
    outputs: OutputsSettings = Field(default_factory=OutputsSettings)
    record: RecordSettings = Field(default_factory=RecordSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    delivery: Literal["exactly_once", "at_least_once"] = "exactly_once"
    learner: Literal["process", "inline"] = Field(
        "process",
        description="Where the models learn: 'process' (a child process, so that learning overlaps with "
        "decoding, encoding and the transport on another core) or 'inline' (this process; one core).",
    )
    cpu_affinity: Literal["auto", "split", "none"] = Field(
        "auto",
        description="With learner: process, 'split' gives the learner process one CPU of its own and the "
        "worker's threads the others; 'auto' does so when the process was confined to a strict subset of "
        "the machine's CPUs (e.g. a Guaranteed pod under the static CPU manager); 'none' never.",
    )


_PASS_THROUGH = ("config", "consumer", "producer")  # dicts of client settings with dotted keys


def _is_secret(key: str) -> bool:
    return any(w in key.lower() for w in _SECRET_WORDS)


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
        if part in _PASS_THROUGH:  # librdkafka-style keys: WORKER__..._CONFIG__SASL_PASSWORD -> sasl.password
            path = path[: i + 1] + [".".join(path[i + 1 :]).replace("_", ".")]
            break
    node[path[-1]] = value


def apply_env(data: dict, env: Mapping[str, str]) -> dict:
    """Overlay ``WORKER__A__B=value`` variables onto the YAML data (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        raw = env[name]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if not (isinstance(value, str | int | float | bool | list | dict) or value is None):
            value = raw  # e.g. a date: keep the text
        if _is_secret(path[-1].replace("_", ".")) or _is_secret(path[-1]):
            value = raw  # a password is text, verbatim: "007" must not become 7
        _set_path(data, path, value)
    return data


def _format_errors(exc: ValidationError) -> ConfigError:
    lines = []
    first_key = ""
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        first_key = first_key or key
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {msg}" if key else msg)
    if len(lines) == 1:
        key, _, msg = lines[0].partition(": ")
        return ConfigError(key if msg else "", msg or key)
    return ConfigError(first_key, "invalid configuration:\n  " + "\n  ".join(lines))


def load_settings(
    path: str | os.PathLike | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read YAML (or take ``data``), apply environment overrides, validate, freeze.

    Also builds the model once so that a bad estimator spec fails here, naming its key.
    """
    if data is None:
        if path is None:
            raw: Any = {}
        else:
            try:
                raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except FileNotFoundError as exc:
                raise ConfigError("", f"config file not found: {path}") from exc
            except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not UTF-8 text
                raise ConfigError("", f"cannot read config file {path}: {exc}") from exc
            except yaml.YAMLError as exc:
                raise ConfigError("", f"config file is not valid YAML: {exc}") from exc
    else:
        raw = dict(data)
    if not isinstance(raw, dict):
        raise ConfigError("", "the configuration must be a mapping at the top level")
    raw = apply_env(raw, os.environ if env is None else env)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise _format_errors(exc) from None
    from worker.models import build_model  # late import: models imports config types

    model = build_model(settings.model)
    if settings.model.mini_batch > 1:
        from worker.models import check_mini_batch

        check_mini_batch(settings, model)
    if settings.monitor.drift.concept.detector is not None:
        _check_concept_detector(settings)
    store = settings.checkpoint.store
    if store is not None and store.startswith("kafka://") and settings.source.type != "kafka":
        raise ConfigError("checkpoint.store", f"{store!r} needs the Kafka transport (source.type: kafka)")
    if settings.source.type == "rabbitmq":
        _check_rabbitmq(settings)
    return settings


def _check_rabbitmq(settings: Settings) -> None:
    if settings.delivery == "exactly_once":
        raise ConfigError("delivery", "RabbitMQ has no transaction spanning the input and output queues: its outputs "
                          "are at-least-once (set delivery: at_least_once; with a checkpoint store every model still "
                          "learns every record exactly once, see docs/rabbitmq.md)")
    r = settings.source.rabbitmq
    assert r is not None
    in_flight = (settings.limits.polls_in_flight + 1) * settings.limits.batch_size
    if settings.checkpoint.store is not None and r.prefetch <= settings.checkpoint.every_records + in_flight:
        raise ConfigError("source.rabbitmq.prefetch", f"{r.prefetch} is too small: deliveries are acked after the "
                          f"snapshot that covers them, so it must exceed checkpoint.every_records "
                          f"({settings.checkpoint.every_records}) plus the records in flight ({in_flight})")


def _check_concept_detector(settings: Settings) -> None:
    """The concept detector spec builds a river drift detector fit for the task."""
    from river import base

    from worker.models.spec import build_estimator

    key = "monitor.drift.concept.detector"
    detector = build_estimator(settings.monitor.drift.concept.detector, key=key)
    name = type(detector).__name__
    if not isinstance(detector, base.DriftDetector | base.BinaryDriftDetector):
        raise ConfigError(key, f"{name} is not a river drift detector (e.g. drift.ADWIN)")
    if isinstance(detector, base.BinaryDriftDetector) and settings.model.task == "regression":
        raise ConfigError(key, f"{name} is a binary-error detector (classification only); "
                          "regression needs one for real-valued errors, e.g. drift.ADWIN or drift.PageHinkley")


def _mask(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _mask(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v, key) for v in obj]
    if isinstance(obj, SecretStr):
        return "**********"
    if obj is not None and _is_secret(key):
        return "**********"
    return obj


def dump_settings(settings: Settings) -> str:
    """The resolved settings as YAML, secrets masked (for ``worker check``)."""
    data = settings.model_dump(mode="python")
    data["checkpoint"]["hmac_key"] = settings.checkpoint.hmac_key
    return yaml.safe_dump(_mask(data), sort_keys=False)
