"""Snapshot stores: where shard states are kept between runs and move between hosts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.checkpoint.base import CheckpointStore
from worker.checkpoint.file import FileStore
from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.config import Settings

WARM_START = "_warm_start"  #: the shard name ``worker train`` writes: any shard without a snapshot of its own starts from it


def open_store(url: str, settings: Settings | None = None) -> CheckpointStore:
    """``file:///dir`` -> FileStore; ``kafka://topic`` -> KafkaStore on ``source.kafka``'s brokers."""
    if url.startswith("file://"):
        return FileStore(url[len("file://") :])
    if url.startswith("kafka://"):
        k = settings.source.kafka if settings is not None else None
        if k is None:
            raise ConfigError("checkpoint.store", "kafka://topic needs source.kafka (its bootstrap_servers)")
        from worker.checkpoint.kafka import KafkaStore

        return KafkaStore(url[len("kafka://") :], k.bootstrap_servers, prefix=k.group_id, conf=dict(k.config))
    raise ConfigError("checkpoint.store", f"unsupported store {url!r}")


__all__ = ["CheckpointStore", "FileStore", "WARM_START", "open_store"]
