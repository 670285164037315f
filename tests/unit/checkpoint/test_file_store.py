"""worker.checkpoint.file: atomic replace, no temporary files left, errors translated."""

from __future__ import annotations

import os

import pytest

from worker.checkpoint import FileStore, open_store
from worker.errors import CheckpointStoreError, ConfigError


def test_save_load_replace(tmp_path):
    store = FileStore(tmp_path / "state")
    assert store.load("s0") is None
    store.save("s0", b"one")
    store.save("s0", b"two")
    store.save("s1", b"other")
    assert (store.load("s0"), store.load("s1")) == (b"two", b"other")
    assert sorted(os.listdir(tmp_path / "state")) == ["s0.snapshot", "s1.snapshot"]  # no temp files


def test_unsafe_shard_names_stay_inside_the_directory(tmp_path):
    store = FileStore(tmp_path / "state")
    for name in ("file:events.jsonl", "../../etc/passwd", "topic/3", "a b"):
        store.save(name, name.encode())
        assert store.load(name) == name.encode()
        assert store.path(name).parent == tmp_path / "state"
    assert not (tmp_path / "etc").exists()


def test_failed_write_keeps_the_old_snapshot_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    store.save("s0", b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointStoreError, match="disk full"):
        store.save("s0", b"new")
    monkeypatch.undo()
    assert store.load("s0") == b"old"
    assert os.listdir(tmp_path) == ["s0.snapshot"]


def test_reader_sees_old_or_new_never_a_mix(tmp_path, monkeypatch):
    """At the moment of the rename, the final name holds the complete old file."""
    store = FileStore(tmp_path)
    store.save("s0", b"A" * 100_000)
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((open(dst, "rb").read(), open(src, "rb").read()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.save("s0", b"B" * 100_000)
    assert seen == [(b"A" * 100_000, b"B" * 100_000)]
    assert store.load("s0") == b"B" * 100_000


def test_directory_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointStoreError):
        FileStore(tmp_path / "file" / "sub")


def test_open_store(tmp_path):
    assert isinstance(open_store(f"file://{tmp_path}/s"), FileStore)
    with pytest.raises(ConfigError) as e:
        open_store("s3://bucket")
    assert e.value.key == "checkpoint.store"


def test_temporary_files_of_killed_writers_are_removed_once_old(tmp_path):
    import time

    store = FileStore(tmp_path)
    stale = tmp_path / ".in-0.snapshot.999999.tmp"  # a writer killed mid-save
    recent = tmp_path / ".in-0.snapshot.999998.tmp"  # maybe another replica's, writing now
    other = tmp_path / ".in-1.snapshot.999999.tmp"  # another shard's: its own save cleans it
    for p in (stale, recent, other):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    store.save("in-0", b"state")
    assert not stale.exists() and recent.exists() and other.exists()
    assert store.load("in-0") == b"state"
