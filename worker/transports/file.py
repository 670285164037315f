"""The file transport: JSON Lines in, JSON Lines out (``-`` is stdin / stdout).

A file is one shard named ``file:<name>``; a record's position is its line number (from 0).
Outputs are appended; at each commit they are flushed and fsynced and their sizes go into
the snapshot, so a restart truncates anything written after the last snapshot and replays
from there: every record is learned once and every output line appears once.

>>> import os, tempfile
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "in.jsonl")
>>> _ = open(p, "wb").write(b'{"x": {"a": 1}}\\n\\n{"x": {"a": 2}}\\n')
>>> src = FileSource(p)
>>> src.start(listener=None)
>>> [(b.shard, b.positions) for b in src.poll(100, 0.0)], src.exhausted
([('file:in.jsonl', [0, 2])], True)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

from worker.errors import SinkError, SourceError
from worker.records import Batch, Outputs
from worker.transports.base import AssignmentListener


def shard_name(path: str) -> str:
    return "file:stdin" if path == "-" else f"file:{Path(path).name}"


class FileSource:
    """Read JSON Lines from a file (or stdin), optionally following it as it grows."""

    def __init__(self, path: str, follow: bool = False, poll_seconds: float = 0.2):
        self.path = path
        self.follow = follow
        self.poll_seconds = poll_seconds
        self.shard = shard_name(path)
        self._file: BinaryIO | None = None
        self._position = 0
        self._partial = b""
        self._eof = False

    def start(self, listener: AssignmentListener | None) -> None:
        self._open()
        if listener is not None:
            listener.on_assign([self.shard])

    def _open(self) -> None:
        if self._file is not None and self._file is not sys.stdin.buffer:
            self._file.close()
        try:
            self._file = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise SourceError(f"cannot open source file {self.path}: {exc}") from exc
        self._position = 0
        self._partial = b""
        self._eof = False

    def identity(self, shard: str) -> dict:
        """What a snapshot keeps of the file it was taken on: its path and a hash of its first line
        (appending does not change it; another file, or this one rewritten, does)."""
        first = None
        if self.path != "-":
            try:
                with open(self.path, "rb") as f:
                    line = f.readline(1 << 20)
                first = hashlib.sha256(line).hexdigest() if line.endswith(b"\n") else None
            except OSError:
                pass
        return {"path": os.path.abspath(self.path) if self.path != "-" else "-", "first_line_sha256": first}

    def seek(self, shard: str, position: int) -> None:
        """Skip to line ``position`` (reopening the file when going back)."""
        if position < self._position:
            if self.path == "-":
                raise SourceError("cannot rewind standard input")
            self._open()
        skip = position - self._position
        if skip > 0:
            assert self._file is not None
            consumed = sum(1 for _ in itertools.islice(self._file, skip))
            self._position += consumed

    def committed(self, shard: str) -> int | None:
        return None  # a file keeps no committed position: the snapshot is the only record

    @property
    def exhausted(self) -> bool:
        return self._eof and not self.follow

    def poll(self, max_records: int, timeout: float) -> list[Batch]:
        assert self._file is not None, "start() first"
        lines = list(itertools.islice(self._file, max_records))
        if not lines:
            if self.follow:
                time.sleep(min(timeout, self.poll_seconds))
            else:
                self._eof = True
            return []
        if len(lines) < max_records and not self.follow:
            self._eof = True
        if self._partial:
            lines[0] = self._partial + lines[0]
            self._partial = b""
        if self.follow and not lines[-1].endswith(b"\n"):
            self._partial = lines.pop()  # a line still being written: wait for its end
            if not lines:
                return []
        values: list[bytes] = []
        positions: list[int] = []
        pos = self._position
        for line in lines:
            if line.strip():
                values.append(line[:-1] if line[-1:] == b"\n" else line)  # the record, not its delimiter
                positions.append(pos)
            pos += 1
        self._position = pos
        return [Batch(self.shard, values, positions)] if values else []

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stdin.buffer:
            self._file.close()
        self._file = None


class FileSink:
    """Append each output kind to its file; several kinds may share one file (or stdout)."""

    def __init__(self, paths: dict[str, str | None]):
        self.paths = {kind: p for kind, p in paths.items() if p}
        self._files: dict[str, BinaryIO] = {}
        try:
            for p in set(self.paths.values()):
                if p == "-":
                    self._files[p] = sys.stdout.buffer
                else:
                    Path(p).parent.mkdir(parents=True, exist_ok=True)
                    self._files[p] = open(p, "ab")  # noqa: SIM115
        except OSError as exc:
            raise SinkError(f"cannot open output file: {exc}") from exc

    def publish(self, outputs: Outputs) -> None:
        try:
            for kind, messages in outputs.by_kind().items():
                if messages and kind in self.paths:
                    f = self._files[self.paths[kind]]
                    f.write(b"\n".join([v for _, v in messages]))
                    f.write(b"\n")
        except OSError as exc:
            raise SinkError(f"cannot write outputs: {exc}") from exc

    def commit(self, positions: dict[str, int]) -> None:
        try:
            for p, f in self._files.items():
                f.flush()
                if p != "-":
                    os.fsync(f.fileno())
        except OSError as exc:
            raise SinkError(f"cannot flush outputs: {exc}") from exc

    def checkpoint_state(self, shard: str, position: int = 0) -> dict:
        return {"sizes": {p: f.tell() for p, f in self._files.items() if p != "-"}}

    def restore(self, shard: str, state: dict) -> None:
        """Cut each output file back to its size at the snapshot (drops outputs not covered by it)."""
        for p, size in state.get("sizes", {}).items():
            f = self._files.get(p)
            if f is not None and f.tell() > size:
                f.flush()
                f.truncate(size)
                f.seek(size)

    def close(self) -> None:
        failed = None
        for p, f in self._files.items():
            try:
                f.flush()
                if p != "-":
                    f.close()
            except OSError as exc:  # (a full disk): the other files are closed all the same
                failed = failed or SinkError(f"cannot write outputs to {p}: {exc}")
        self._files = {}
        if failed is not None:
            raise failed
