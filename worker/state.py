"""A shard's whole state, and its snapshot format.

A snapshot is one JSON header line followed by a pickle of :class:`ShardState`. The header
carries the format version, the river and Python versions, the hash of the model spec, the
shard and the position the state reflects, the body's length and SHA-256, and an HMAC-SHA256
of the body when a key is configured. :func:`loads_snapshot` refuses (loudly, before
unpickling anything) a torn body, another spec, another river version, or a bad signature.

>>> from river import linear_model
>>> st = ShardState(shard="s0", model=linear_model.LinearRegression(), position=42)
>>> blob = dumps_snapshot(st, spec="abc")
>>> loads_snapshot(blob, spec="abc").position
42
>>> loads_snapshot(blob, spec="other")
Traceback (most recent call last):
...
worker.errors.SnapshotError: snapshot of shard s0 was made for model spec other than this one (snapshot abc, configured other): refusing to load it; move it away or restore the original model config
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import river

from worker.errors import SnapshotError

FORMAT_VERSION = 1
MAGIC = b"RWSNAP"


@dataclass
class ShardState:
    """Everything a shard needs to continue exactly where it stopped."""

    shard: str
    model: Any
    quality: Any = None
    concept: Any = None  #: ConceptDrift on the error stream, or None
    data_drift: Any = None  #: DistributionDrift over the input features, or None
    prediction_drift: Any = None  #: DistributionDrift over the predictions, or None
    challenger: Any = None  #: a Challenger learning in shadow, or None
    position: int = 0  #: the next source position to process (line number, offset, ...)
    model_version: int = 1
    records_seen: int = 0
    #: classification: "string" or "number" (integers and booleans), the kind of the first label
    #: this shard saw; a label of the other kind is dead-lettered (``invalid_target``)
    label_kind: str | None = None
    extra: dict = field(default_factory=dict)  #: transport-specific state (e.g. output file sizes)


@dataclass(frozen=True)
class SnapshotHeader:
    format: int
    river: str
    python: str
    spec: str
    shard: str
    position: int
    created: float
    length: int
    sha256: str
    hmac: str | None


LEARNER_FIELDS = ("model", "concept", "challenger", "model_version")


class _Joined:
    """Pickles as one :class:`ShardState`: the monitor's part with the learner fields set from the learner's blob.

    The parts were pickled where they live (the learner fields in the learner process); the
    snapshot still loads as one plain ShardState, and nothing is unpickled to write it.
    """

    def __init__(self, main: bytes, learner: bytes):
        self.main, self.learner = main, learner

    def __reduce__(self) -> tuple:
        return _join, (self.main, self.learner)


def _join(main: bytes, learner: bytes) -> ShardState:
    return join_learner(pickle.loads(main), learner)


def pickle_learner(state: ShardState, names: tuple[str, ...] = LEARNER_FIELDS) -> bytes:
    """Some learner fields of ``state``, pickled (to move them to or from the learner process)."""
    return pickle.dumps({name: getattr(state, name) for name in names}, protocol=5)


def join_learner(state: ShardState, blob: bytes) -> ShardState:
    """Set the fields in :func:`pickle_learner`'s blob on ``state``; returns ``state``."""
    for name, value in pickle.loads(blob).items():
        setattr(state, name, value)
    return state


def pickle_monitor(state: ShardState, names: tuple[str, ...] = LEARNER_FIELDS) -> bytes:
    """``state`` pickled without the learner fields ``names`` (they come from the learner)."""
    return pickle.dumps(replace(state, **{n: None for n in names if n != "model_version"}), protocol=5)


def dumps_snapshot(state: ShardState, spec: str, key: bytes | None = None, learner: bytes | None = None,
                   names: tuple[str, ...] = LEARNER_FIELDS) -> bytes:
    """Serialise a shard state with its header (signed when ``key`` is given).

    ``learner``: the pickled learner fields ``names`` when they live elsewhere.
    """
    if learner is None:
        return _frame(pickle.dumps(state, protocol=5), state.shard, state.position, spec, key)
    return dumps_parts(state.shard, state.position, pickle_monitor(state, names), learner, spec, key)


def dumps_parts(shard: str, position: int, main: bytes, learner: bytes, spec: str, key: bytes | None = None) -> bytes:
    """A snapshot from the two pickled parts of a state at ``position`` (see :func:`pickle_monitor`)."""
    return _frame(pickle.dumps(_Joined(main, learner), protocol=5), shard, position, spec, key)


def _frame(body: bytes, shard: str, position: int, spec: str, key: bytes | None) -> bytes:
    header = {
        "format": FORMAT_VERSION,
        "river": river.__version__,
        "python": platform.python_version(),
        "spec": spec,
        "shard": shard,
        "position": position,
        "created": time.time(),
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "hmac": hmac.new(key, body, hashlib.sha256).hexdigest() if key else None,
    }
    return MAGIC + orjson.dumps(header) + b"\n" + body


def read_header(blob: bytes) -> tuple[SnapshotHeader, memoryview]:
    """Parse and check the header and the body's integrity (no unpickling)."""
    if not blob.startswith(MAGIC):
        raise SnapshotError("not a worker snapshot (bad magic)")
    end = blob.find(b"\n")
    if end < 0:
        raise SnapshotError("torn snapshot: no header")
    try:
        header = SnapshotHeader(**orjson.loads(blob[len(MAGIC) : end]))
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise SnapshotError(f"corrupt snapshot header: {exc}") from None
    body = memoryview(blob)[end + 1 :]
    if len(body) != header.length or hashlib.sha256(body).hexdigest() != header.sha256:
        raise SnapshotError(f"torn or corrupt snapshot of shard {header.shard}: body does not match its header")
    return header, body


def loads_snapshot(blob: bytes, spec: str, key: bytes | None = None) -> ShardState:
    """Check a snapshot and restore the state; raise SnapshotError rather than half-load."""
    header, body = read_header(blob)
    if header.format != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format {header.format} is not supported (this worker reads {FORMAT_VERSION})")
    if header.spec != spec:
        raise SnapshotError(
            f"snapshot of shard {header.shard} was made for model spec other than this one "
            f"(snapshot {header.spec}, configured {spec}): refusing to load it; "
            "move it away or restore the original model config"
        )
    if header.river != river.__version__:
        raise SnapshotError(
            f"snapshot of shard {header.shard} was made with river {header.river}, this worker runs "
            f"river {river.__version__}: refusing to load it"
        )
    if key is not None:
        if header.hmac is None:
            raise SnapshotError(f"snapshot of shard {header.shard} is not signed but checkpoint.hmac_key is set")
        if not hmac.compare_digest(header.hmac, hmac.new(key, body, hashlib.sha256).hexdigest()):
            raise SnapshotError(f"snapshot of shard {header.shard} has a bad signature (another hmac_key?)")
    try:
        state = pickle.loads(body)
    except Exception as exc:  # a body that passed its checksum but cannot be unpickled
        raise SnapshotError(f"snapshot of shard {header.shard} cannot be restored: {exc!r}") from None
    if not isinstance(state, ShardState):
        raise SnapshotError("snapshot body is not a shard state")
    return state
