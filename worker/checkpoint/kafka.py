"""Snapshots in a compacted Kafka topic (``checkpoint.store: kafka://topic``).

A partition's state can then move between hosts with no shared disk. Layout, all on
partition 0 of the topic (created compacted if missing):

- ``<group>/<shard>/<id>/<i>``: chunk ``i`` of snapshot ``id`` (at most ``chunk_bytes``
  each, so a snapshot of any size fits under the broker's message size limit);
- ``<group>/<shard>``: the manifest, written **last**: ``{"id", "chunks", "length", "sha256"}``.

A reader takes the manifest and the chunks it names; chunks of a snapshot whose manifest
was never written (a crash mid-save) are never referenced, so a torn set is never loaded.
After a manifest is acknowledged, the chunks of older snapshots of the shard are deleted
with tombstones, and compaction reclaims them.
"""

from __future__ import annotations

import hashlib
import uuid

import orjson

from worker.errors import CheckpointStoreError, TransportError

DEFAULT_CHUNK_BYTES = 512 * 1024


class KafkaStore:
    """One manifest and its chunks per shard, keyed under ``prefix`` (the consumer group)."""

    def __init__(
        self,
        topic: str,
        bootstrap_servers: str,
        prefix: str,
        conf: dict | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        create: bool = True,
    ):
        from worker.transports.kafka import CompactedLog, create_topics  # the client stays in transports

        self.topic = topic
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        try:
            if create:
                create_topics(bootstrap_servers, [topic], partitions=1, config={"cleanup.policy": "compact"}, conf=conf)
            self.log = CompactedLog(bootstrap_servers, topic, conf)
        except TransportError as exc:
            raise CheckpointStoreError(f"checkpoint topic {topic}: {exc}") from exc
        self.entries: dict[bytes, bytes] = {}

    def _manifest_key(self, shard: str) -> bytes:
        return f"{self.prefix}/{shard}".encode()

    def _chunk_key(self, shard: str, snap: str, i: int) -> bytes:
        return f"{self.prefix}/{shard}/{snap}/{i}".encode()

    def _catch_up(self) -> None:
        try:
            for key, value in self.log.read():
                if value is None:
                    self.entries.pop(key, None)
                else:
                    self.entries[key] = value
        except TransportError as exc:
            raise CheckpointStoreError(f"cannot read checkpoint topic {self.topic}: {exc}") from exc

    def load(self, shard: str) -> bytes | None:
        self._catch_up()
        raw = self.entries.get(self._manifest_key(shard))
        if raw is None:
            return None
        try:
            manifest = orjson.loads(raw)
            parts = [self.entries.get(self._chunk_key(shard, manifest["id"], i)) for i in range(int(manifest["chunks"]))]
            length, sha256 = manifest["length"], manifest["sha256"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointStoreError(f"the manifest of shard {shard} in {self.topic} is unreadable: {exc!r}") from exc
        if any(p is None for p in parts):
            raise CheckpointStoreError(f"snapshot {manifest['id']} of shard {shard} in {self.topic} lacks chunks")
        blob = b"".join(parts)  # type: ignore[arg-type]
        if len(blob) != length or hashlib.sha256(blob).hexdigest() != sha256:
            raise CheckpointStoreError(f"snapshot {manifest['id']} of shard {shard} in {self.topic} is corrupt")
        return blob

    def save(self, shard: str, blob: bytes) -> None:
        snap = uuid.uuid4().hex[:16]
        n = max(1, -(-len(blob) // self.chunk_bytes))
        records: list[tuple[bytes, bytes | None]] = [
            (self._chunk_key(shard, snap, i), blob[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]) for i in range(n)
        ]
        manifest = orjson.dumps({"id": snap, "chunks": n, "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        records.append((self._manifest_key(shard), manifest))
        old = [k for k in self.entries if k.startswith(self._manifest_key(shard) + b"/")]
        try:
            self.log.append(records)  # acknowledged in order: the manifest after its chunks
            if old:
                self.log.append((k, None) for k in old)
        except TransportError as exc:
            raise CheckpointStoreError(f"cannot write snapshot of {shard} to {self.topic}: {exc}") from exc
        for k in old:
            self.entries.pop(k, None)
        for k, v in records:
            self.entries[k] = v  # type: ignore[assignment]

    def close(self) -> None:
        self.log.close()
