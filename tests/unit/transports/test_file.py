"""worker.transports.file: positions, partial lines with follow, sink commit/restore truncation."""

from __future__ import annotations

import orjson

from worker.records import Outputs
from worker.transports.file import FileSink, FileSource, shard_name


def test_positions_are_line_numbers_and_records_have_no_newline(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n{"a": 3}')
    src = FileSource(str(p))
    src.start(None)
    (batch,) = src.poll(100, 0.0)
    assert batch.shard == shard_name(str(p)) == "file:in.jsonl"
    assert batch.positions == [0, 2, 3]
    assert [batch.values[0], batch.values[1].rstrip(b"\r"), batch.values[2]] == [b'{"a": 1}', b'{"a": 2}', b'{"a": 3}']
    assert src.exhausted


def test_seek_forward_and_back(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join(b'{"i": %d}\n' % i for i in range(10)))
    src = FileSource(str(p))
    src.start(None)
    src.seek(src.shard, 7)
    assert src.poll(100, 0.0)[0].positions == [7, 8, 9]
    src.seek(src.shard, 2)
    assert src.poll(3, 0.0)[0].positions == [2, 3, 4]
    src.close()


def test_follow_waits_for_the_end_of_a_partial_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": ')
    src = FileSource(str(p), follow=True, poll_seconds=0.001)
    src.start(None)
    (batch,) = src.poll(100, 0.0)
    assert batch.values == [b'{"a": 1}'] and not src.exhausted
    with open(p, "ab") as f:
        f.write(b'2}\n')
    batches = []
    for _ in range(5):  # bounded
        batches += src.poll(100, 0.0)
    assert [(b.values, b.positions) for b in batches] == [([b'{"a": 2}'], [1])]
    src.close()


def test_sink_restore_cuts_outputs_back_to_the_snapshot(tmp_path):
    paths = {"predictions": str(tmp_path / "p.jsonl"), "dead_letter": str(tmp_path / "p.jsonl"), "metrics": None, "drift": None}
    sink = FileSink(paths)
    sink.publish(Outputs(predictions=[(None, b"p1"), (None, b"p2")], dead_letters=[(None, b"d1")]))
    sink.commit({"s": 3})
    state = sink.checkpoint_state("s")
    sink.publish(Outputs(predictions=[(None, b"p3")]))
    sink.commit({"s": 4})
    sink.close()
    # a restart: outputs written after the snapshot are cut
    sink = FileSink(paths)
    sink.restore("s", state)
    sink.publish(Outputs(predictions=[(None, b"p3-again")]))
    sink.close()
    assert (tmp_path / "p.jsonl").read_bytes() == b"p1\np2\nd1\np3-again\n"


def test_a_full_disk_at_the_close_is_a_sink_error_and_every_close_still_runs(tmp_path):
    """/dev/full takes writes into the buffer and refuses the flush (ENOSPC), as a full disk does."""
    import pytest

    from worker.config import load_settings
    from worker.errors import SinkError
    from worker.learning import Engine
    from worker.runtime import Runtime

    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"x": {"a": 1.0}, "y": 1}\n' * 10)
    settings = load_settings(data={"learner": "inline", "telemetry": {"port": None}}, env={})
    closed = []

    class Store:  # (a snapshot store that only says whether it was closed)
        def load(self, shard):
            return None

        def save(self, shard, blob):
            pass

        def close(self):
            closed.append("store")

    runtime = Runtime(Engine(settings), FileSource(str(data)), FileSink({"predictions": "/dev/full"}), Store())
    with pytest.raises(SinkError, match="No space left"):  # (the commit meets it first; the close logs its own)
        runtime.run()
    assert closed == ["store"]


def test_a_snapshot_of_another_file_of_the_same_name_is_refused_not_resumed(tmp_path):
    """Resuming at its position would skip that many records of a file it never read."""
    import pytest

    from worker.checkpoint import FileStore
    from worker.config import load_settings
    from worker.errors import SnapshotError
    from worker.learning import Engine
    from worker.runtime import Runtime

    def run(data):
        settings = load_settings(data={"learner": "inline", "telemetry": {"port": None}}, env={})
        out = tmp_path / "out" / data.parent.name
        sink = FileSink({"predictions": str(out / "p.jsonl")})
        Runtime(Engine(settings), FileSource(str(data)), sink, FileStore(tmp_path / "state")).run()
        return (out / "p.jsonl").read_bytes().count(b"\n")

    def write(folder, lines):
        (tmp_path / folder).mkdir(exist_ok=True)
        path = tmp_path / folder / "events.jsonl"
        path.write_bytes(b"".join(b'{"id": %d, "x": {"a": %d.0}, "y": 1}\n' % (i, i % 5) for i in lines))
        return path

    first = write("d1", range(50))
    assert run(first) == 50
    with pytest.raises(SnapshotError, match="first line differs"):
        run(write("d2", range(100, 130)))
    moved = write("d3", range(60))  # the same file, moved and grown: resumes at 50
    assert run(moved) == 10


def test_changed_monitor_settings_apply_to_a_restored_shard_whose_model_is_kept(tmp_path):
    from worker.checkpoint import FileStore
    from worker.config import load_settings
    from worker.learning import Engine
    from worker.runtime import Runtime

    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(b'{"id": %d, "x": {"a": %d.0}, "y": %d}\n' % (i, i % 5, i % 2) for i in range(300)))

    def run(window: int) -> tuple[dict, int]:
        settings = load_settings(data={"learner": "inline", "telemetry": {"port": None},
                                       "monitor": {"window": window}}, env={})
        out = tmp_path / f"metrics-{window}.jsonl"
        runtime = Runtime(Engine(settings), FileSource(str(data)), FileSink({"metrics": str(out)}),
                          FileStore(tmp_path / "state"))
        runtime.run()
        return orjson.loads(out.read_bytes().splitlines()[-1]), runtime.records

    first, _ = run(1000)
    assert first["records"] == 300
    data.write_bytes(data.read_bytes() + b'{"id": 300, "x": {"a": 1.0}, "y": 1}\n' * 20)  # (more records)
    second, _ = run(10)
    assert second["records"] == 320  # the same shard, resumed (its model too)
    assert second["cumulative"]["n"] == 20 and second["rolling"]["n"] == 10  # metrics afresh, on the new window
