"""The snapshot-store protocol: most stores implement three methods."""

from __future__ import annotations

from typing import Protocol


class CheckpointStore(Protocol):
    def load(self, shard: str) -> bytes | None:
        """The shard's latest complete snapshot, or None if it has none."""

    def save(self, shard: str, blob: bytes) -> None:
        """Store a snapshot atomically: a reader sees the old one or the new one, never a mix."""

    def close(self) -> None: ...
