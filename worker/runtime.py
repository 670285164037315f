"""The loop: poll -> process -> publish -> commit -> snapshot; assignments; signals.

Checkpoint order (the one place it is written down, and tested):

1. ``sink.commit(positions)``: every published output is durable (flushed and fsynced;
   for Kafka exactly-once, the transaction with the consumed offsets is committed);
2. then each shard's snapshot (model, metrics, detectors, position, transport state) is
   written atomically to the checkpoint store.

A snapshot therefore never reflects a record whose outputs are not durable. On start or
assignment a shard restores its snapshot (position S), the source seeks to S, and records
between S and the source's committed position C are learned again without publishing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from worker.checkpoint import WARM_START, CheckpointStore
from worker.errors import SnapshotError
from worker.learning import Engine, Shard
from worker.state import dumps_snapshot, loads_snapshot
from worker.transports.base import Sink, Source

log = logging.getLogger("worker.runtime")


class Runtime:
    """Wires a source, the shards, a sink and a checkpoint store together."""

    def __init__(
        self,
        engine: Engine,
        source: Source,
        sink: Sink,
        store: CheckpointStore | None = None,
        hmac_key: bytes | None = None,
    ):
        self.engine = engine
        self.source = source
        self.sink = sink
        self.store = store
        self.hmac_key = hmac_key
        self.shards: dict[str, Shard] = {}
        self.publish_from: dict[str, int] = {}
        self._stop = threading.Event()
        cp = engine.settings.checkpoint
        self._cp_every_records = cp.every_records
        self._cp_every_seconds = cp.every_seconds
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self.records = 0

    # -- assignment listener -------------------------------------------------------------
    def on_assign(self, shards: list[str]) -> None:
        for name in shards:
            state = self._restore(name)
            shard = self.engine.shard(name, state)
            self.shards[name] = shard
            committed = self.source.committed(name)
            self.publish_from[name] = max(shard.state.position, committed or 0)
            if state is not None:
                self.sink.restore(name, state.extra.get("sink", {}))
            self.source.seek(name, shard.state.position)
            log.info(
                "shard assigned",
                extra={"shard": name, "position": shard.state.position, "publish_from": self.publish_from[name]},
            )
        self.engine.telemetry.shards.set(len(self.shards))
        self.engine.telemetry.set_ready(True)

    def on_revoke(self, shards: list[str]) -> None:
        owned = [s for s in shards if s in self.shards]
        if owned:
            self.sink.commit({s: self.shards[s].state.position for s in owned})
            for name in owned:
                self._snapshot(name)
        self._forget(owned)

    def on_lost(self, shards: list[str]) -> None:
        self._forget([s for s in shards if s in self.shards])

    def _forget(self, shards: list[str]) -> None:
        for name in shards:
            self.shards.pop(name, None)
            self.publish_from.pop(name, None)
            self.engine.telemetry.forget_shard(name)
        self.engine.telemetry.shards.set(len(self.shards))

    # -- snapshots -----------------------------------------------------------------------
    def _restore(self, name: str) -> Any:
        if self.store is None:
            return None
        blob = self.store.load(name)
        if blob is not None:
            return loads_snapshot(blob, self.engine.spec, self.hmac_key)
        warm = self.store.load(WARM_START)
        if warm is None:
            return None
        state = loads_snapshot(warm, self.engine.spec, self.hmac_key)
        log.info("shard starts from the warm-start snapshot", extra={"shard": name})
        state.shard, state.position, state.extra = name, 0, {}
        return state

    def _snapshot(self, name: str) -> None:
        if self.store is None:
            return
        tel = self.engine.telemetry
        state = self.shards[name].state
        state.extra["sink"] = self.sink.checkpoint_state(name)
        started = time.perf_counter()
        try:
            self.store.save(name, dumps_snapshot(state, self.engine.spec, self.hmac_key))
        except Exception:
            tel.checkpoints.labels(outcome="error").inc()
            raise
        tel.checkpoints.labels(outcome="ok").inc()
        tel.checkpoint_seconds.observe(time.perf_counter() - started)
        tel.last_checkpoint.labels(shard=name).set(time.time())

    def checkpoint(self) -> None:
        """Commit outputs and positions, then snapshot every shard (in that order)."""
        self.sink.commit({name: s.state.position for name, s in self.shards.items()})
        for name in list(self.shards):
            self._snapshot(name)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    # -- the loop ------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> int:
        """Run until the source is exhausted or stop() is called; returns an exit code."""
        settings = self.engine.settings
        batch_size = settings.limits.batch_size
        tel = self.engine.telemetry
        started = time.monotonic()
        self.source.start(self)
        try:
            while not self._stop.is_set():
                tel.beat()
                batches = self.source.poll(batch_size, 0.1)
                for batch in batches:
                    shard = self.shards.get(batch.shard)
                    if shard is None:  # revoked between poll and now
                        continue
                    out = shard.process(
                        batch.values, batch.positions, publish_from=self.publish_from[batch.shard],
                        timestamps=batch.timestamps,
                    )
                    self.sink.publish(out)
                    self.records += len(batch.values)
                    self._since_checkpoint += len(batch.values)
                if self.store is not None and (
                    self._since_checkpoint >= self._cp_every_records
                    or time.monotonic() - self._last_checkpoint >= self._cp_every_seconds
                ):
                    self.checkpoint()
                if not batches and self.source.exhausted:
                    break
            for shard in self.shards.values():
                self.sink.publish(_final_report(shard))
            self.checkpoint() if self.store is not None else self.sink.commit(
                {n: s.state.position for n, s in self.shards.items()}
            )
        finally:
            tel.set_ready(False)
            self.source.close()
            self.sink.close()
            if self.store is not None:
                self.store.close()
        log.info(
            "worker stopped",
            extra={"records": self.records, "seconds": round(time.monotonic() - started, 3), "shards": len(self.shards)},
        )
        return 0


def _final_report(shard: Shard):
    from worker.records import Outputs

    out = Outputs()
    if shard.state.records_seen:
        out.metrics.append((None, shard.report()))
    return out


__all__ = ["Runtime", "SnapshotError"]
