"""worker.codec: every dead-letter reason, data preparation rules, and property tests."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.codec import REASONS, BadRecord, Decoder, dumps, encode_dead_letter, original_payload, prediction_encoder
from worker.config import FilterRule, LimitsSettings, RecordSettings, load_settings
from worker.learning import Engine


def decoder(task: str = "classification", keep_missing: bool = False, limits: dict | None = None, **record) -> Decoder:
    return Decoder(RecordSettings(**record), LimitsSettings(**(limits or {})), task, keep_missing=keep_missing)


def reason_of(d: Decoder, value: bytes) -> str:
    with pytest.raises(BadRecord) as e:
        d.decode(value)
    assert e.value.reason in REASONS
    assert e.value.detail
    return e.value.reason


DEEP_ORJSON = 1100  # orjson refuses nesting deeper than 1024


# -- every reason the decoder produces ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"x": {"a": 1}', "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"x": {"a": 1}} trailing', "invalid_json"),
        (b'{"x": {"a": NaN}, "y": 1}', "non_finite_number"),
        (b'{"x": {"a": Infinity}, "y": 1}', "non_finite_number"),
        (b'[1, 2]', "not_an_object"),
        (b'"a string"', "not_an_object"),
        (b"3.5", "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"id": 1, "y": 1}', "missing_features"),
        (b'{"x": null, "y": 1}', "missing_features"),
        (b'{"x": [1, 2], "y": 1}', "features_not_object"),
        (b'{"x": "a=1", "y": 1}', "features_not_object"),
        (b'{"x": 3, "y": 1}', "features_not_object"),
        (b'{"x": {"a": {"b": 1}}, "y": 1}', "nested_feature"),
        (b'{"x": {"a": [1, 2]}, "y": 1}', "nested_feature"),
        (b'{"x": {"a": 1}, "y": 1.5}', "invalid_target"),
        (b'{"x": {"a": 1}, "y": [1]}', "invalid_target"),
        (b'{"x": {"a": 1}, "y": {"c": 1}}', "invalid_target"),
        (b'{"id": 1.5, "x": {"a": 1}}', "invalid_id"),
        (b'{"id": [1], "x": {"a": 1}}', "invalid_id"),
        (b'{"id": true, "x": {"a": 1}}', "invalid_id"),
        (b'{"id": 1, "k": {"u": 1}, "x": {"a": 1}}', "invalid_key"),
        (b'{"id": 1, "k": 2.5, "x": {"a": 1}}', "invalid_key"),
        (b'{"x": {"a": 1}, "ts": {"t": 1}}', "invalid_timestamp"),
        (b'{"x": {"a": 1}, "ts": "yesterday"}', "invalid_timestamp"),
        (b'{"x": {"a": 1}, "ts": "1700000000"}', "invalid_timestamp"),
        (b'{"x": {"a": 1}, "ts": true}', "invalid_timestamp"),
        (b'{"x": {"a": 1}, "ts": [1]}', "invalid_timestamp"),
    ],
)
def test_dead_letter_reasons(value, reason):
    assert reason_of(decoder(key="k", timestamp="ts"), value) == reason


def test_a_timestamp_is_a_number_of_seconds_or_absent():
    d = decoder(timestamp="meta.ts")
    assert d.decode(b'{"x": {"a": 1}, "meta": {"ts": 1700000000}}')[4] == 1700000000
    assert d.decode(b'{"x": {"a": 1}, "meta": {"ts": 1.5}}')[4] == 1.5
    assert d.decode(b'{"x": {"a": 1}, "meta": {"ts": null}}')[4] is None
    assert d.decode(b'{"x": {"a": 1}}')[4] is None
    assert reason_of(d, b'{"x": {"a": 1}, "meta": {"ts": false}}') == "invalid_timestamp"


@pytest.mark.parametrize(
    "value",
    [b'{"x": {"a": 1e999}, "y": 1}', b'{"x": {"a": -1e999}, "y": 1}', b'{"x": {"a": -Infinity}, "y": 1}',
     b'{"x": {"a": 1' + b"0" * 400 + b"}, \"y\": 1}"],
    ids=["1e999", "-1e999", "-Infinity", "400-digit-integer"],
)
def test_numbers_that_overflow_or_negative_infinity_are_non_finite(value):
    assert reason_of(decoder(), value) == "non_finite_number"


def test_numbers_that_overflow_never_reach_the_model():
    """Whatever the reason, 1e999 is refused (the part that must hold today)."""
    with pytest.raises(BadRecord):
        decoder().decode(b'{"x": {"a": 1e999}, "y": 1}')


def test_nesting_deeper_than_orjson_allows_is_too_deep():
    value = b'{"x": {"a": 1}, "y": ' + b"[" * DEEP_ORJSON + b"]" * DEEP_ORJSON + b"}"
    assert reason_of(decoder(), value) == "too_deep"


def test_deep_nesting_is_refused_without_crashing():
    value = b'{"x": {"a": 1}, "y": ' + b"[" * DEEP_ORJSON + b"]" * DEEP_ORJSON + b"}"
    with pytest.raises(BadRecord):
        decoder().decode(value)


def test_too_large_is_checked_before_parsing():
    d = decoder(limits={"max_record_bytes": 64})
    small = b'{"x": {"a": 1}, "y": 1}'
    assert d.decode(small) is not None
    assert reason_of(d, small[:-1] + b" " * 64 + b"}") == "too_large"
    assert reason_of(d, b"\xff" * 65) == "too_large"  # not even JSON: size first


def test_too_many_features():
    d = decoder(limits={"max_features": 3})
    assert d.decode(b'{"x": {"a": 1, "b": 2, "c": 3}}')[2] == {"a": 1, "b": 2, "c": 3}
    assert reason_of(d, b'{"x": {"a": 1, "b": 2, "c": 3, "d": 4}}') == "too_many_features"


@pytest.mark.parametrize(
    ("task", "target", "ok"),
    [
        ("classification", "true", True),
        ("classification", '"cat"', True),
        ("classification", "3", True),
        ("classification", "3.0", False),
        ("regression", "3.5", True),
        ("regression", "3", True),
        ("regression", "true", False),
        ("regression", '"3.5"', False),
        ("regression", "[3.5]", False),
    ],
)
def test_target_types_per_task(task, target, ok):
    value = b'{"x": {"a": 1}, "y": ' + target.encode() + b"}"
    d = decoder(task)
    if ok:
        assert d.decode(value)[3] == orjson.loads(target)
    else:
        assert reason_of(d, value) == "invalid_target"


@pytest.mark.parametrize("task", ["clustering", "anomaly"])
def test_unsupervised_tasks_ignore_the_target(task):
    assert decoder(task).decode(b'{"x": {"a": 1}, "y": [1, 2]}')[3] is None


def test_every_reason_is_listed_and_the_list_is_small():
    assert len(set(REASONS)) == len(REASONS) <= 20
    assert "model_error" in REASONS  # produced by the learner, not the decoder


# -- preparation -------------------------------------------------------------------------------


def test_missing_values_dropped_or_kept():
    value = b'{"x": {"a": 1, "b": null, "c": "z"}}'
    assert decoder().decode(value)[2] == {"a": 1, "c": "z"}
    assert decoder(keep_missing=True).decode(value)[2] == {"a": 1, "b": None, "c": "z"}


@pytest.mark.parametrize(
    ("missing", "pipeline", "kept"),
    [
        ("auto", [{"linear_model.LogisticRegression": {}}], False),
        ("auto", [{"preprocessing.StatImputer": [["a", {"stats.Mean": {}}]]}, {"linear_model.LogisticRegression": {}}], True),
        ("keep", [{"linear_model.LogisticRegression": {}}], True),
        ("drop", [{"preprocessing.StatImputer": [["a", {"stats.Mean": {}}]]}, {"linear_model.LogisticRegression": {}}], False),
    ],
)
def test_missing_setting_keep_drop_auto(missing, pipeline, kept):
    engine = Engine(load_settings(data={"record": {"missing": missing}, "model": {"pipeline": pipeline}}, env={}))
    x = engine.decoder.decode(b'{"x": {"a": null, "b": 2}}')[2]
    assert x == ({"a": None, "b": 2} if kept else {"b": 2})


def test_dotted_paths_for_every_field():
    d = decoder(id="meta.id", key="meta.user", features="payload.features", target="payload.label", timestamp="meta.ts")
    value = orjson.dumps({"meta": {"id": "r1", "user": 42, "ts": 1700000000.5},
                          "payload": {"features": {"a": 1.5}, "label": "spam"}})
    assert d.decode(value) == ("r1", 42, {"a": 1.5}, "spam", 1700000000.5)
    # a path through a non-object, or a missing branch, is "missing"
    assert reason_of(d, b'{"payload": 3}') == "missing_features"
    assert d.decode(b'{"meta": "x", "payload": {"features": {"a": 1}}}')[:2] == (None, None)


def test_features_as_a_list_of_top_level_fields():
    d = decoder(features=["age", "country", "score"], target="label")
    rid, key, x, y, ts = d.decode(b'{"id": 1, "age": 31, "country": "fr", "other": 9, "label": true}')
    assert x == {"age": 31, "country": "fr"} and y is True and rid == 1
    assert reason_of(d, b'{"age": {"years": 31}}') == "nested_feature"
    assert reason_of(d, b'{"other": 1, "label": true}') == "missing_features"  # none present
    assert d.decode(b'{"age": null}')[2] == {}  # present, null: a missing value, as in a features object


def test_features_as_a_list_with_dotted_paths():
    d = decoder(features=["age", "geo.country", "meta.device.os"], target="label")
    value = b'{"age": 31, "geo": {"country": "fr", "city": "Lyon"}, "meta": {"device": {"os": "ios"}}, "label": 1}'
    assert d.decode(value)[2] == {"age": 31, "geo.country": "fr", "meta.device.os": "ios"}
    assert d.decode(b'{"geo": {"country": "de"}, "meta": "x"}')[2] == {"geo.country": "de"}
    assert reason_of(d, b'{"geo": 3, "meta": {"device": {}}}') == "missing_features"
    assert reason_of(d, b'{"geo": {"country": [1]}}') == "nested_feature"
    kept = decoder(features=["geo.country", "geo.city"], keep_missing=True)
    assert kept.decode(b'{"geo": {"country": null, "city": "Lyon"}}')[2] == {"geo.country": None, "geo.city": "Lyon"}


@pytest.mark.parametrize(
    ("op", "value", "dropped", "kept"),
    [
        ("eq", "bot", {"u": {"kind": "bot"}}, {"u": {"kind": "human"}}),
        ("ne", "human", {"u": {"kind": "bot"}}, {"u": {"kind": "human"}}),
        ("lt", 0, {"u": {"kind": -1}}, {"u": {"kind": 0}}),
        ("le", 0, {"u": {"kind": 0}}, {"u": {"kind": 1}}),
        ("gt", 10, {"u": {"kind": 11}}, {"u": {"kind": 10}}),
        ("ge", 10, {"u": {"kind": 10}}, {"u": {"kind": 9.5}}),
        ("in", ["a", "b"], {"u": {"kind": "a"}}, {"u": {"kind": "c"}}),
        ("not_in", ["a", "b"], {"u": {"kind": "c"}}, {"u": {"kind": "b"}}),
        ("missing", None, {"u": {}}, {"u": {"kind": 1}}),
        ("present", None, {"u": {"kind": 1}}, {"u": {}}),
    ],
)
def test_drop_if_rules(op, value, dropped, kept):
    d = decoder(drop_if=[FilterRule(field="u.kind", op=op, value=value)])
    assert d.decode(orjson.dumps({**dropped, "x": {"a": 1}})) is None
    assert d.decode(orjson.dumps({**kept, "x": {"a": 1}})) is not None


def test_drop_if_comparison_of_incomparable_types_does_not_drop_or_raise():
    d = decoder(drop_if=[FilterRule(field="age", op="lt", value=0)])
    assert d.decode(b'{"age": "young", "x": {"a": 1}}') is not None
    assert d.decode(b'{"x": {"a": 1}}') is not None  # missing field: lt does not apply


def test_drop_if_runs_before_validation():
    """A record dropped by a rule is filtered, not dead-lettered, even if its features are bad."""
    d = decoder(drop_if=[FilterRule(field="kind", op="eq", value="heartbeat")])
    assert d.decode(b'{"kind": "heartbeat"}') is None


# -- dead letters --------------------------------------------------------------------------------


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_dead_letter_keeps_the_original_bytes(value):
    dl = orjson.loads(encode_dead_letter(value, "invalid_json", "detail", "shard-0", 17, 123.5))
    assert original_payload(dl) == value
    assert (dl["event"], dl["reason"], dl["shard"], dl["position"], dl["ts"]) == (
        "dead_letter", "invalid_json", "shard-0", 17, 123.5)


def test_dead_letter_of_non_utf8_is_base64():
    dl = orjson.loads(encode_dead_letter(b'{"x": "\xff"}', "invalid_json", "d", "s", 0, 0.0))
    assert dl["payload"] is None and dl["payload_base64"]
    assert original_payload(dl) == b'{"x": "\xff"}'


# -- properties -----------------------------------------------------------------------------------


@given(st.binary(max_size=400))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_raise_only_bad_record(value):
    for d in (decoder(), decoder("regression", keep_missing=True, key="k", features="p.f")):
        try:
            d.decode(value)
        except BadRecord as e:
            assert e.reason in REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["x", "y", "id", "k", "a", "f"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=15,
)


@given(st.dictionaries(st.sampled_from(["x", "y", "id", "k", "p"]) | st.text(max_size=4), json_values, max_size=5))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_json_objects_raise_only_bad_record(obj):
    value = orjson.dumps(obj)
    for task in ("classification", "regression", "anomaly"):
        try:
            out = decoder(task, key="k").decode(value)
        except BadRecord as e:
            assert e.reason in REASONS
        else:
            _, _, x, _, _ = out
            assert all(type(v) in (int, float, str, bool) for v in x.values())


scalar = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=10)
    | st.booleans()
    | st.none()
)


@given(
    st.dictionaries(st.text(max_size=10), scalar, max_size=20),
    st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5), st.booleans()),
    st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_valid_records_decode_to_exactly_their_features(features, y, keep_missing):
    value = orjson.dumps({"id": "r", "x": features, "y": y})
    rid, key, x, got_y, ts = decoder(keep_missing=keep_missing).decode(value)
    expected = features if keep_missing else {k: v for k, v in features.items() if v is not None}
    assert x == expected
    assert [type(v) for v in x.values()] == [type(v) for v in expected.values()]
    assert list(x) == list(expected)  # order kept: some models sum in key order
    assert all(math.isfinite(v) for v in x.values() if isinstance(v, float))
    assert (rid, key, got_y, ts) == ("r", None, y, None)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_no_non_finite_float_ever_reaches_the_output(values):
    """Non-finite floats written the ways producers write them (Python's json does NaN/Infinity)."""
    import json

    value = json.dumps({"x": {f"f{i}": v for i, v in enumerate(values)}, "y": 1}).encode()
    try:
        x = decoder().decode(value)[2]
    except BadRecord:
        assert not all(math.isfinite(v) for v in values)
    else:
        assert all(math.isfinite(v) for v in x.values())
        assert all(math.isfinite(v) for v in values)


_ids = st.none() | st.integers(-(2**63), 2**63 - 1) | st.text()
_labels = st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5)
_floats = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(shard=st.text(), extra_name=st.sampled_from([None, "proba", "score"]), rid=_ids, key=_ids,
       pred=st.none() | _labels | _floats, extra=st.none() | _floats | st.dictionaries(_labels, _floats, max_size=4),
       version=st.integers(0, 10**6), pos=st.integers(0, 2**62), ts=_floats)
def test_prediction_encoder_writes_the_bytes_of_the_dict(shard, extra_name, rid, key, pred, extra, version, pos, ts):
    rec = {"id": rid, "key": key, "prediction": pred}
    if extra_name is not None:
        rec[extra_name] = extra
    rec.update({"model_version": version, "shard": shard, "position": pos, "ts": ts})
    assert prediction_encoder(shard, extra_name)(rid, key, pred, extra, version, pos, ts) == dumps(rec)


def test_prediction_encoder_takes_numpy_values_as_dumps_does():
    encode = prediction_encoder("s", "score")
    got = orjson.loads(encode(1, None, np.float64(0.5), np.float32(0.25), 2, np.int64(7), 1.0))
    assert got == {"id": 1, "key": None, "prediction": 0.5, "score": 0.25, "model_version": 2, "shard": "s",
                   "position": 7, "ts": 1.0}


@pytest.mark.parametrize("value", [b'{"x": "' + "é".encode() * 100_000 + b'"}', b"\xff" + b"\x00" * 300_000])
def test_a_long_payload_is_cut_so_that_its_dead_letter_fits_an_output(value):
    from worker.codec import DEAD_LETTER_PAYLOAD_BYTES

    encoded = encode_dead_letter(value, "too_large", "d", "s", 9, 0.0)
    dl = orjson.loads(encoded)
    assert dl["payload_truncated"] is True and dl["payload_bytes"] == len(value)
    assert original_payload(dl) == value[:DEAD_LETTER_PAYLOAD_BYTES]  # exact bytes, even cut through a character
    assert len(encoded) < 1_000_000  # Kafka's default message.max.bytes
    assert "payload_truncated" not in orjson.loads(encode_dead_letter(b"{", "invalid_json", "d", "s", 0, 0.0))
