"""worker.state: snapshot round trip, and every way a snapshot is refused before unpickling."""

from __future__ import annotations

import pickle

import orjson
import pytest
import river
from river import linear_model, preprocessing

from worker.errors import SnapshotError
from worker.state import MAGIC, ShardState, dumps_snapshot, loads_snapshot, read_header


def trained_state(n: int = 50) -> ShardState:
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    for i in range(n):
        model.learn_one({"a": float(i % 5), "b": float(i % 3)}, i % 2 == 0)
    return ShardState(shard="events-0", model=model, position=n, records_seen=n, extra={"sink": {"sizes": {"p": 10}}})


def with_header(blob: bytes, **changes) -> bytes:
    """The same body under a header with some fields changed (checksums still valid)."""
    end = blob.find(b"\n")
    header = orjson.loads(blob[len(MAGIC):end])
    header.update(changes)
    return MAGIC + orjson.dumps(header) + blob[end:]


def test_round_trip_restores_the_exact_state():
    st = trained_state()
    restored = loads_snapshot(dumps_snapshot(st, spec="abc"), spec="abc")
    assert (restored.shard, restored.position, restored.records_seen, restored.extra) == ("events-0", 50, 50, st.extra)
    x = {"a": 2.0, "b": 1.0}
    assert restored.model.predict_proba_one(x) == st.model.predict_proba_one(x)
    # and it keeps learning identically
    for m in (st.model, restored.model):
        m.learn_one(x, False)
    assert restored.model.predict_proba_one(x) == st.model.predict_proba_one(x)


def test_header_describes_the_snapshot():
    blob = dumps_snapshot(trained_state(), spec="abc", key=b"k")
    header, body = read_header(blob)
    assert (header.spec, header.shard, header.position, header.river) == ("abc", "events-0", 50, river.__version__)
    assert header.length == len(body) and header.hmac


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_torn_body_is_refused(cut):
    blob = dumps_snapshot(trained_state(), spec="abc")
    with pytest.raises(SnapshotError, match="torn|corrupt"):
        loads_snapshot(blob[:-cut], spec="abc")


def test_flipped_byte_is_refused():
    blob = bytearray(dumps_snapshot(trained_state(), spec="abc"))
    blob[-20] ^= 0xFF
    with pytest.raises(SnapshotError, match="torn|corrupt"):
        loads_snapshot(bytes(blob), spec="abc")


@pytest.mark.parametrize("blob", [b"", b"garbage", MAGIC, MAGIC + b"{not json}\nbody", MAGIC + b'{"format": 1}\nbody'])
def test_not_a_snapshot_is_refused(blob):
    with pytest.raises(SnapshotError):
        loads_snapshot(blob, spec="abc")


def test_other_spec_is_refused():
    with pytest.raises(SnapshotError, match="spec"):
        loads_snapshot(dumps_snapshot(trained_state(), spec="abc"), spec="def")


def test_other_river_version_is_refused():
    blob = with_header(dumps_snapshot(trained_state(), spec="abc"), river="0.0.1")
    with pytest.raises(SnapshotError, match="river 0.0.1"):
        loads_snapshot(blob, spec="abc")


def test_other_format_is_refused():
    blob = with_header(dumps_snapshot(trained_state(), spec="abc"), format=99)
    with pytest.raises(SnapshotError, match="format"):
        loads_snapshot(blob, spec="abc")


def test_hmac_signed_snapshot_loads_with_its_key():
    blob = dumps_snapshot(trained_state(), spec="abc", key=b"secret")
    assert loads_snapshot(blob, spec="abc", key=b"secret").position == 50


def test_unsigned_snapshot_is_refused_when_a_key_is_configured():
    with pytest.raises(SnapshotError, match="not signed"):
        loads_snapshot(dumps_snapshot(trained_state(), spec="abc"), spec="abc", key=b"secret")


def test_snapshot_signed_with_another_key_is_refused():
    with pytest.raises(SnapshotError, match="bad signature"):
        loads_snapshot(dumps_snapshot(trained_state(), spec="abc", key=b"one"), spec="abc", key=b"two")


def test_forged_body_with_recomputed_checksum_is_refused_by_the_hmac():
    """An attacker who can write the store can fix the sha256, not the HMAC: nothing is unpickled."""
    blob = dumps_snapshot(trained_state(), spec="abc", key=b"secret")
    evil = pickle.dumps(ShardState(shard="events-0", model=None, position=10**9))
    import hashlib

    forged = with_header(MAGIC + blob[len(MAGIC):blob.find(b"\n") + 1] + evil,
                         length=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    with pytest.raises(SnapshotError, match="bad signature"):
        loads_snapshot(forged, spec="abc", key=b"secret")


def test_body_that_is_not_a_shard_state_is_refused():
    import hashlib

    body = pickle.dumps({"not": "a state"})
    blob = with_header(dumps_snapshot(trained_state(), spec="abc"), length=len(body), sha256=hashlib.sha256(body).hexdigest())
    blob = blob[: blob.find(b"\n") + 1] + body
    with pytest.raises(SnapshotError, match="not a shard state"):
        loads_snapshot(blob, spec="abc")
