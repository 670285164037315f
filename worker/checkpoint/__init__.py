"""Snapshot stores: where shard states are kept between runs and move between hosts."""

from __future__ import annotations

from worker.checkpoint.base import CheckpointStore
from worker.checkpoint.file import FileStore
from worker.errors import ConfigError

WARM_START = "_warm_start"  #: the shard name ``worker train`` writes: any shard without a snapshot of its own starts from it


def open_store(url: str) -> CheckpointStore:
    """``file:///dir`` -> FileStore (``kafka://topic`` is opened by the Kafka transport)."""
    if url.startswith("file://"):
        return FileStore(url[len("file://") :])
    raise ConfigError("checkpoint.store", f"unsupported store {url!r}")


__all__ = ["CheckpointStore", "FileStore", "WARM_START", "open_store"]
