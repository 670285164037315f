"""The Source and Sink protocols every transport implements.

The runtime drives them in one direction: ``source.poll`` -> shards -> ``sink.publish``,
and, at a commit point, ``sink.commit(positions)`` then (less often) a snapshot.
A source tells the runtime which shards it owns through an :class:`AssignmentListener`.
"""

from __future__ import annotations

from typing import Protocol

from worker.errors import SinkError
from worker.records import Batch, Outputs


class Rewind(SinkError):
    """The sink dropped every output published since its last commit (an aborted transaction).

    The runtime answers by restoring each shard from its last snapshot and reading again
    from there; records below the committed position are learned without publishing.
    """


class AssignmentListener(Protocol):
    def on_assign(self, shards: list[str]) -> None:
        """The source now owns these shards; restore their state before their records arrive."""

    def on_revoke(self, shards: list[str]) -> None:
        """The source is giving these shards up (orderly): commit and snapshot them now."""

    def on_lost(self, shards: list[str]) -> None:
        """These shards were taken away (not orderly): drop their state without committing."""


class Source(Protocol):
    def start(self, listener: AssignmentListener) -> None:
        """Connect and begin; assignments are reported to ``listener``."""

    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        """Up to ``max_records`` records, grouped by shard in source order ([] when idle)."""

    def seek(self, shard: str, position: int) -> None:
        """Continue ``shard`` from ``position`` (after a restore)."""

    def committed(self, shard: str) -> int | None:
        """The shard's committed position (outputs below it are published), if the source keeps one."""

    @property
    def exhausted(self) -> bool:
        """True when a finite source has nothing more to give (a file without follow)."""

    def close(self) -> None: ...


class Sink(Protocol):
    def publish(self, outputs: Outputs) -> None:
        """Hand one batch's outputs to the transport (may buffer)."""

    def commit(self, positions: dict[str, int]) -> None:
        """Make every published output durable and record ``positions`` where the transport can."""

    def checkpoint_state(self, shard: str, position: int) -> dict:
        """Transport state to keep in the shard's snapshot at ``position`` (e.g. output sizes)."""

    def restore(self, shard: str, state: dict) -> None:
        """Undo outputs published after the snapshot that ``state`` came from, where possible."""

    def close(self) -> None: ...

# Optional sink members the runtime uses when present:
#   commit_every: float      -> commit outputs and positions this often (seconds), besides snapshots,
#                               as commit(positions, wait=False): it may leave part of it for a
#                               later commit instead of blocking (commit() alone always waits)
#   abort() -> bool          -> drop uncommitted outputs (shards were lost); True if any were dropped
#   snapshotted(shard, position) -> a snapshot of the shard at position is durable (RabbitMQ acks
#                               the deliveries below it then)
