"""The loop: poll -> process -> publish -> commit -> snapshot; assignments; signals.

Checkpoint order (the one place it is written down, and tested):

1. ``sink.commit(positions)``: every published output is durable (flushed and fsynced;
   for Kafka exactly-once, the transaction with the consumed offsets is committed);
2. then each shard's snapshot (model, metrics, detectors, position, transport state) is
   written atomically to the checkpoint store.

A snapshot therefore never reflects a record whose outputs are not durable. On start or
assignment a shard restores its snapshot (position S), the source seeks to S, and records
between S and the source's committed position C are learned again without publishing.

Pipelining: the models live in a learner host (:mod:`worker.learner`), by default a child
process. Each step polls a batch, decodes it (:meth:`Shard.begin`) and submits it to the
learners, then collects the results of the polls in flight, oldest first, and encodes and
publishes their outputs (:meth:`Shard.finish`): those whose results are back (not under
the data-drift freeze policy), and always enough to leave at most
``limits.polls_in_flight`` polls in flight (all of them when the poll brought nothing, so
that outputs never wait for the next records). With two in flight
the child has poll k+2 queued while this process finishes poll k, so neither side waits for
the other when one poll takes longer than the next. A shard's position moves when its
outputs are published, so a commit never covers a record in flight. A periodic snapshot is
taken between two polls without stopping the learner (:meth:`Runtime._begin_snapshot`);
before a revoke, the final commit and a checkpoint under the data-drift freeze policy the
polls in flight are finished first (drained); on a rewind or a lost partition they are
thrown away with the state they came from.

A sink with a ``commit_every`` attribute (Kafka) is also committed that often between
snapshots, with ``wait=False``: such a sink may leave the commit for later instead of
blocking (Kafka at-least-once commits what the broker acknowledged by then); every other
commit (before a snapshot, a revoke, the stop) waits until the outputs are durable.
Positions are committed only once a shard has caught up with its committed position
(never backwards). When the sink raises :class:`~worker.transports.base.Rewind`
(an aborted transaction) or :class:`~worker.errors.FencedError`, every owned shard is
restored from its snapshot and read again (:meth:`Runtime.rewind`): nothing uncommitted
was published, so nothing is published twice.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any

from worker.checkpoint import WARM_START, CheckpointStore
from worker.errors import FencedError, SnapshotError
from worker.learner import InlineLearners, ProcessLearners, open_learners
from worker.learning import Engine, Pending, Shard
from worker.records import Outputs
from worker.state import ShardState, dumps_parts, dumps_snapshot, loads_snapshot, pickle_monitor
from worker.transports.base import Rewind, Sink, Source

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
        stop_event: threading.Event | None = None,
        learners: InlineLearners | ProcessLearners | None = None,
    ):
        self.engine = engine
        self.learners = learners if learners is not None else open_learners(engine.settings)
        engine.telemetry.learner_pid = self.learners.pid  # (its CPU and memory in /metrics)
        # Polls submitted to the learners, not published, oldest first: (begun batches, with a dump)
        self._inflight: deque[tuple[list[tuple[Shard, Pending]], bool]] = deque()
        self._depth = engine.settings.limits.polls_in_flight
        self.source = source
        self.sink = sink
        self.store = store
        self.hmac_key = hmac_key
        self.shards: dict[str, Shard] = {}
        self.publish_from: dict[str, int] = {}
        self._stop = stop_event if stop_event is not None else threading.Event()
        cp = engine.settings.checkpoint
        self._cp_every_records = cp.every_records
        self._cp_every_seconds = cp.every_seconds
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._commit_every: float | None = getattr(sink, "commit_every", None)
        self._on_snapshot = getattr(sink, "snapshotted", None)  # (RabbitMQ: acks what a durable snapshot covers)
        self._last_commit = time.monotonic()
        # The snapshot waiting for the learners' half: {shard: (position, pickled monitor part)}
        self._parts: dict[str, tuple[int, bytes]] | None = None
        # Snapshots between polls need begin() to leave snapshot state alone (not with freeze).
        # With freeze, begin() also moves the data-drift statistics of the metrics reports, so
        # a poll is published only when it must be: the reports then do not depend on timing.
        self._overlapped_snapshots = engine.settings.monitor.drift.data.policy != "freeze"
        self._publish_early = self._overlapped_snapshots
        self._rewind_pending = False
        self._fenced_in_row = 0  # fences since the last commit known to have succeeded
        self._commit_started = False  # the last commit did not wait: it may still fail
        self._failed = False  # the loop died: a last revoke (at the source's close) must commit nothing
        self._snapshotted: dict[str, int] = {}  # the position of each shard's last drained snapshot
        self._identity = getattr(source, "identity", None)  # what a snapshot keeps of its source (file: path, first line)
        self.records = 0

    # -- assignment listener -------------------------------------------------------------
    def on_assign(self, shards: list[str]) -> None:
        for name in shards:
            state, own = self._restore(name)
            if own and self._identity is not None:
                self._check_identity(name, state)
            if own and self.engine.refresh_monitors(state):
                log.warning("the monitor settings changed since the snapshot: quality metrics and drift "
                            "detectors start afresh (the model is kept)", extra={"shard": name})
            shard = self.engine.shard(name, state)
            self.shards[name] = shard
            self.learners.load(shard.state, fresh=state is None)
            committed = self.source.committed(name)
            self.publish_from[name] = max(shard.state.position, committed or 0)
            if own:
                try:
                    self.sink.restore(name, state.extra.get("sink", {}))
                except (Rewind, FencedError):  # the commit in flight failed (its outputs are gone):
                    self._rewind_pending = True  # rewind every shard once all are set up, the new ones too
                    self.sink.restore(name, state.extra.get("sink", {}))
            elif self.store is not None:
                # a first snapshot at once: a crash before the first checkpoint then rolls back to here
                self._snapshot(name)
            self.source.seek(name, shard.state.position)
            log.info(
                "shard assigned",
                extra={"shard": name, "position": shard.state.position, "publish_from": self.publish_from[name]},
            )
        self.engine.telemetry.shards.set(len(self.shards))
        self.engine.telemetry.set_ready(True)

    def _check_identity(self, name: str, state: ShardState) -> None:
        """Refuse a snapshot taken on another source under the same shard name (a file of the
        same name elsewhere, or this one rewritten): resuming at its position would skip records."""
        taken, now = state.extra.get("source"), self._identity(name)
        if taken and taken.get("first_line_sha256") and now.get("first_line_sha256") \
                and taken["first_line_sha256"] != now["first_line_sha256"]:
            raise SnapshotError(
                f"the snapshot of shard {name} was taken reading {taken.get('path')}, whose first line differs "
                f"from {now.get('path')}'s: another file, or this one rewritten. Resuming would skip its first "
                f"{state.position} records; use another checkpoint store, or delete the snapshot"
            )

    def on_revoke(self, shards: list[str]) -> None:
        owned = [s for s in shards if s in self.shards]
        if self._failed:  # a poll may have been taken off the queue and not published: commit nothing
            self._forget(owned)
            return
        if owned:
            try:  # one commit covers every shard's outputs, so commit every shard's position
                self._drain()
                self.sink.commit(self.positions())
            except (Rewind, FencedError):
                self._forget(owned)
                self._rewind_pending = True
                raise
            for name in owned:  # (not again when nothing came since the last one: the stop's checkpoint)
                if self._snapshotted.get(name) != self.shards[name].state.position:
                    self._snapshot(name)
        self._forget(owned)

    def on_lost(self, shards: list[str]) -> None:
        lost = [s for s in shards if s in self.shards]
        self._forget(lost)
        if lost and not self._failed:  # the other shards' batches in flight are still good
            self._drain()
        abort = getattr(self.sink, "abort", None)
        if lost and abort is not None and abort():
            self._rewind_pending = True  # the other shards' uncommitted outputs went with it

    def positions(self) -> dict[str, int]:
        """Positions to commit: shards still replaying below their committed position are left out."""
        return {n: s.state.position for n, s in self.shards.items() if s.state.position >= self.publish_from[n]}

    def rewind(self) -> None:
        """Restore every owned shard from its snapshot and read again from there (after an abort)."""
        self._rewind_pending = False
        self._commit_started = False  # (its failure is what brought us here, or it settled before)
        names = list(self.shards)
        log.warning("uncommitted outputs were dropped: rewinding to the last snapshots", extra={"shards": names})
        while self.learners.pending:  # learned from states about to be thrown away
            self.learners.collect()
        self.learners.take_dumps()
        self._inflight.clear()
        self._parts = None
        self._forget(names)
        if names:
            self.on_assign(names)

    def _forget(self, shards: list[str]) -> None:
        for name in shards:
            if self.shards.pop(name, None) is not None:
                self.learners.drop(name)
            self.publish_from.pop(name, None)
            self._snapshotted.pop(name, None)
            self.engine.telemetry.forget_shard(name)
        self.engine.telemetry.shards.set(len(self.shards))

    # -- snapshots -----------------------------------------------------------------------
    def _restore(self, name: str) -> tuple[Any, bool]:
        """(state or None, whether it is the shard's own snapshot)."""
        if self.store is None:
            return None, False
        blob = self.store.load(name)
        if blob is not None:
            return loads_snapshot(blob, self.engine.spec, self.hmac_key), True
        warm = self.store.load(WARM_START)
        if warm is None:
            return None, False
        state = loads_snapshot(warm, self.engine.spec, self.hmac_key)
        log.info("shard starts from the warm-start snapshot", extra={"shard": name})
        state.shard, state.position, state.extra = name, 0, {}
        return state, False

    def _snapshot(self, name: str) -> None:
        """Snapshot a shard now (nothing of it may be in flight)."""
        if self.store is None:
            return
        state = self.shards[name].state
        self._stamp(name, state)
        fields = self.engine.learner.fields
        self._save(name, state.position,
                   lambda: dumps_snapshot(state, self.engine.spec, self.hmac_key, self.learners.dump(name), fields))
        self._snapshotted[name] = state.position

    def _stamp(self, name: str, state: ShardState) -> None:
        """The transport's part of a snapshot: the sink's state, and what identifies the source."""
        state.extra["sink"] = self.sink.checkpoint_state(name, state.position)
        state.extra["monitor"] = self.engine.monitor_spec
        if self._identity is not None:
            state.extra["source"] = self._identity(name)

    def _save(self, name: str, position: int, make: Any) -> None:
        """Write a shard's snapshot at ``position``; then tell a sink that acts on durable snapshots."""
        tel = self.engine.telemetry
        started = time.perf_counter()
        try:
            blob = make()
            self.store.save(name, blob)
        except Exception:
            tel.checkpoints.labels(outcome="error").inc()
            raise
        tel.checkpoints.labels(outcome="ok").inc()
        tel.snapshot_bytes.labels(shard=name).set(len(blob))
        tel.checkpoint_seconds.observe(time.perf_counter() - started)
        tel.last_checkpoint.labels(shard=name).set(time.time())
        if self._on_snapshot is not None:
            self._on_snapshot(name, position)

    def checkpoint(self) -> None:
        """Finish the polls in flight, commit outputs and positions, then snapshot every shard (in that order)."""
        self._drain()
        self._commit()
        for name in list(self.shards):
            self._snapshot(name)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def _commit(self, wait: bool = True) -> None:
        if wait:
            self.sink.commit(self.positions())
        else:  # the periodic commit: a sink with commit_every may leave part of it for later
            self.sink.commit(self.positions(), wait=False)
        self._last_commit = time.monotonic()
        # A commit has succeeded: this one, if it waited; else the one before it, in the background
        # (a sink settles it when this call begins, raising its failure there).
        if wait or self._commit_started:
            self._fenced_in_row = 0
        self._commit_started = not wait

    def _begin_snapshot(self) -> None:
        """Overlapped checkpoint, first half, once every poll before the one submitted with a dump
        is published (the learners pickle their fields as of that same point): commit, then
        keep each shard's monitor part at the committed position."""
        self._commit()
        fields = self.engine.learner.fields
        parts = {}
        for name, shard in self.shards.items():
            state = shard.state
            self._stamp(name, state)
            parts[name] = (state.position, pickle_monitor(state, fields))
        self._parts = parts

    def _end_snapshot(self) -> None:
        """Second half, when the learners' fields arrived: write each snapshot still ours."""
        dumps = self.learners.take_dumps()
        parts, self._parts = self._parts, None
        if dumps is None or parts is None:
            return
        for name, (position, main) in parts.items():
            if name in self.shards and name in dumps:
                self._save(name, position,
                           lambda: dumps_parts(name, position, main, dumps[name], self.engine.spec, self.hmac_key))

    def _recover(self, exc: Exception) -> None:
        if isinstance(exc, FencedError):
            self._fenced_in_row += 1
            if self._fenced_in_row > 3:
                raise exc
        log.warning("transaction aborted: %s", exc)
        self.rewind()

    # -- the loop ------------------------------------------------------------------------
    def _step(self, batch_size: int) -> list:
        """One poll: begin its batches, submit them to the learners, publish the polls in flight
        whose results are back, then commit / checkpoint when due."""
        # With polls in flight, take only what is already there: their outputs must not wait
        # for the next records.
        batches = self.source.poll(batch_size, 0.0 if self._inflight else 0.1)
        if self._rewind_pending:  # shards were lost with uncommitted outputs of the others
            self.rewind()
            return batches
        begun = []
        for batch in batches:
            shard = self.shards.get(batch.shard)
            if shard is None:  # revoked between poll and now
                continue
            pending = shard.begin(
                batch.values, batch.positions, publish_from=self.publish_from[batch.shard],
                timestamps=batch.timestamps,
            )
            if pending is not None:
                begun.append((shard, pending))
            self.records += len(batch.values)
            self._since_checkpoint += len(batch.values)
        now = time.monotonic()
        due = self.store is not None and (
            self._since_checkpoint >= self._cp_every_records or now - self._last_checkpoint >= self._cp_every_seconds
        )
        # An overlapped snapshot: the learners pickle their fields before learning this poll,
        # this process its own once every earlier poll is published; both are then at the same position.
        # (At most one under way: from the poll asking for it until that poll is published.)
        overlapped = due and self._overlapped_snapshots and not any(dump for _, dump in self._inflight)
        if begun or overlapped:
            self.learners.submit([p.request for _, p in begun], dump=overlapped)
            self._inflight.append((begun, overlapped))
            if overlapped:
                self._since_checkpoint, self._last_checkpoint = 0, now
                if len(self._inflight) == 1:
                    self._begin_snapshot()
        self._publish_ready(everything=not begun)
        if due and not self._overlapped_snapshots:  # (freeze) drained instead
            self.checkpoint()
        elif self._commit_every is not None and now - self._last_commit >= self._commit_every:
            self._commit(wait=False)
        return batches

    def _publish_ready(self, everything: bool = False, drain: bool = False) -> None:
        """Finish and publish the polls in flight, oldest first: those whose results are back,
        at least down to ``limits.polls_in_flight`` of them, and all of them with ``everything``
        or ``drain``. A drain begins no overlapped snapshot (one not begun by then is dropped:
        the learners' half is thrown away)."""
        everything = everything or drain
        while self._inflight and (everything or len(self._inflight) > self._depth
                                  or (self._publish_early and self.learners.has_result())):
            begun, dump = self._inflight.popleft()
            results = self.learners.collect()
            if dump:  # the learners' half of the snapshot came with these results
                self._end_snapshot()
            for (shard, pending), result in zip(begun, results, strict=True):
                if self.shards.get(shard.state.shard) is shard:  # not lost or revoked meanwhile
                    self.sink.publish(shard.finish(pending, result))
            # Every poll before the dump is published: the worker's half. Not when draining: a drain
            # is followed by a full checkpoint, or serves a lost partition, where committing the
            # transaction would publish the lost shard's uncommitted outputs.
            if not drain and self._inflight and self._inflight[0][1]:
                self._begin_snapshot()

    def _drain(self) -> None:
        """Finish and publish every poll in flight."""
        self._publish_ready(drain=True)

    def stop(self, *_: Any) -> None:
        """Finish the batch, commit, snapshot and leave; ``/readyz`` says so at once."""
        self._stop.set()
        self.engine.telemetry.set_ready(False)

    def _signalled(self, signum: int, frame: Any) -> None:
        if not self._stop.is_set():
            self.stop()
            return
        # A second signal: whatever the clean stop waits for (a learner that does not answer,
        # a broker), the operator wants out now. Outputs since the last commit are not
        # committed: the restart replays them (see docs/operations.md).
        log.error("second %s during the stop: exiting now, without committing", signal.Signals(signum).name)
        os._exit(1)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._signalled)
        signal.signal(signal.SIGINT, self._signalled)

    def _close(self) -> Exception | None:
        """Close source, sink, learners and store, each even if one before failed; the first failure."""
        first = None
        for close in (self.source.close, self.sink.close, self.learners.close,
                      self.store.close if self.store is not None else None):
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - logged here, raised by run() when nothing else was
                log.error("closing failed: %s", exc)
                first = first or exc
        return first

    def run(self) -> int:
        """Run until the source is exhausted or stop() is called; returns an exit code."""
        settings = self.engine.settings
        batch_size = settings.limits.batch_size
        tel = self.engine.telemetry
        started = time.monotonic()
        # Everything alive now (modules, settings, clients) lives as long as the run: keep it
        # out of the cyclic GC's full collections (about 20% of the loop's time otherwise).
        gc.freeze()
        self.source.start(self)
        try:
            while not self._stop.is_set():
                tel.beat()
                try:
                    batches = self._step(batch_size)
                except (Rewind, FencedError) as exc:
                    self._recover(exc)
                    continue
                if not batches and self.source.exhausted:
                    break
            self._drain()
            final = Outputs()
            for shard in self.shards.values():
                report = shard.pending_report()
                if report is not None:
                    final.metrics.append((None, report))
            self.sink.publish(final)
            self.checkpoint() if self.store is not None else self.sink.commit(self.positions())
        except BaseException:
            self._failed = True
            raise
        finally:
            tel.set_ready(False)
            close_error = self._close()  # (the loop's own error, if any, is the one raised)
        if close_error is not None:
            raise close_error
        log.info(
            "worker stopped",
            extra={"records": self.records, "seconds": round(time.monotonic() - started, 3), "shards": len(self.shards)},
        )
        return 0


__all__ = ["Runtime", "SnapshotError"]
