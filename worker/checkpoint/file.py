"""Snapshots as files: written to a temporary name, fsynced, renamed, directory fsynced.

>>> import tempfile
>>> store = FileStore(tempfile.mkdtemp())
>>> store.save("events-0", b"state")
>>> store.load("events-0"), store.load("events-1")
(b'state', None)
"""

from __future__ import annotations

import glob
import os
import re
import time
from pathlib import Path

from worker.errors import CheckpointStoreError

_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")
STALE_SECONDS = 600  #: a temporary snapshot file older than this is a killed writer's


class FileStore:
    """One file per shard under ``directory`` (created if needed)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointStoreError(f"cannot create checkpoint directory {self.directory}: {exc}") from exc

    def path(self, shard: str) -> Path:
        return self.directory / (_UNSAFE.sub("_", shard) + ".snapshot")

    def load(self, shard: str) -> bytes | None:
        try:
            return self.path(shard).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointStoreError(f"cannot read snapshot {self.path(shard)}: {exc}") from exc

    def save(self, shard: str, blob: bytes) -> None:
        final = self.path(shard)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self._remove_stale(final)
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointStoreError(f"cannot write snapshot {final}: {exc}") from exc

    def _remove_stale(self, final: Path) -> None:
        """Temporary files of this shard left by a writer killed mid-save (they can be as large
        as the model). Only old ones: on a shared directory another replica may be writing one."""
        cutoff = time.time() - STALE_SECONDS
        for old in self.directory.glob(f".{glob.escape(final.name)}.*.tmp"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass

    def close(self) -> None:
        return None
