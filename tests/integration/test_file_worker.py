"""End to end on the file transport: ``python -m worker ...`` as real processes.

Every process is started here, bounded by a timeout, and signalled only by its own pid.
Nothing here asserts on time: kills are triggered by observed progress (output growth).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml
from river import evaluate, linear_model, metrics, preprocessing
from river.datasets import synth

from worker.codec import original_payload
from worker.state import read_header

TIMEOUT = 120  # seconds, bound on any one worker process
PIPELINE = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
FIELDS = ["id", "key", "prediction", "proba", "model_version", "shard", "position", "ts"]


def plain_model():
    return preprocessing.StandardScaler() | linear_model.LogisticRegression()


def records(n: int, seed: int = 1) -> list[tuple[dict, int]]:
    return [(orjson.loads(orjson.dumps(x)), y) for x, y in itertools.islice(synth.Agrawal(seed=seed), n)]


BAD = {  # position -> (bytes, reason)
    3: (b"{not json", "invalid_json"),
    7: (b'{"id": "nan", "user": "u", "x": {"a": NaN}, "y": 1}', "non_finite_number"),
    11: (b'\xff\xfe{"x": 1}', "invalid_json"),
    13: (b'{"id": 13, "user": "u", "x": [1, 2], "y": 1}', "features_not_object"),
}


def write_stream(path: Path, data: list, bad: dict | None = None, start_id: int = 0) -> dict[int, int]:
    """JSON lines; ``bad`` lines are inserted at their positions. Returns position -> index in data."""
    bad = bad or {}
    where = {}
    with open(path, "wb") as f:
        it = iter(enumerate(data))
        pos = 0
        while True:
            if pos in bad:
                f.write(bad[pos][0] + b"\n")
            else:
                try:
                    i, (x, y) = next(it)
                except StopIteration:
                    break
                f.write(orjson.dumps({"id": start_id + i, "user": f"u{i % 5}", "x": x, "y": y}) + b"\n")
                where[pos] = i
            pos += 1
    return where


def config(tmp: Path, data: Path, **overrides) -> Path:
    cfg = {
        "source": {"type": "file", "file": {"path": str(data)}},
        "outputs": {k: str(tmp / "out" / f"{k}.jsonl") for k in ("predictions", "drift", "metrics", "dead_letter")},
        "record": {"id": "id", "key": "user", "features": "x", "target": "y"},
        "model": {"task": "classification", "pipeline": PIPELINE},
        "monitor": {"every_records": 1000},
        "checkpoint": {"store": f"file://{tmp / 'state'}", "every_records": 1000},
        "telemetry": {"port": None},
        "limits": {"batch_size": 100},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / "worker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def worker(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()] if path.exists() else []


def plain_loop(data: list, model=None) -> tuple[list, list]:
    model = model or plain_model()
    preds, probas = [], []
    for x, y in data:
        probas.append(orjson.loads(orjson.dumps(model.predict_proba_one(x), option=orjson.OPT_NON_STR_KEYS)))
        preds.append(model.predict_one(x))
        model.learn_one(x, y)
    return preds, probas


# -- one uninterrupted run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    data = records(1500)
    where = write_stream(tmp / "events.jsonl", data, BAD)
    done = worker("run", "--config", str(config(tmp, tmp / "events.jsonl")), cwd=tmp)
    assert done.returncode == 0, done.stderr
    return tmp, data, where


def test_prediction_output_fields(small_run):
    tmp, data, where = small_run
    preds = read_jsonl(tmp / "out" / "predictions.jsonl")
    assert len(preds) == len(data)
    for p in preds:
        assert list(p) == FIELDS
        i = where[p["position"]]
        assert p["id"] == i and p["key"] == f"u{i % 5}"
        assert p["shard"] == "file:events.jsonl" and p["model_version"] == 1
        assert isinstance(p["ts"], float) and p["prediction"] in (0, 1)
    assert sorted(p["position"] for p in preds) == sorted(where)


def test_predictions_equal_a_plain_river_loop(small_run):
    tmp, data, where = small_run
    preds = sorted(read_jsonl(tmp / "out" / "predictions.jsonl"), key=lambda p: p["position"])
    want_pred, want_proba = plain_loop(data)
    assert [p["prediction"] for p in preds] == want_pred
    assert [p["proba"] for p in preds] == want_proba


def test_dead_letters_carry_reason_original_bytes_and_position(small_run):
    tmp, *_ = small_run
    dls = read_jsonl(tmp / "out" / "dead_letter.jsonl")
    assert {d["position"]: (original_payload(d), d["reason"]) for d in dls} == BAD
    assert all(d["event"] == "dead_letter" and d["shard"] == "file:events.jsonl" and d["detail"] for d in dls)


def test_metrics_lines(small_run):
    tmp, data, _ = small_run
    ms = read_jsonl(tmp / "out" / "metrics.jsonl")
    assert ms and all(m["event"] == "metrics" for m in ms)
    last = ms[-1]
    assert last["cumulative"]["n"] == len(data) and last["position"] == len(data) + len(BAD)
    assert set(last["cumulative"]) >= {"accuracy", "f1", "log_loss"}


# -- SIGKILL at random moments ------------------------------------------------------------------


def run_killed(tmp: Path, cfg: Path, kills: int, rng: random.Random) -> int:
    """Run, SIGKILL after the predictions file grew by a random amount (progress, not time), ``kills``
    times, then run to completion. Returns the number of kills that hit a running worker."""
    out = tmp / "out" / "predictions.jsonl"
    hits = 0
    for attempt in range(kills + 5):
        proc = start("run", "--config", str(cfg), cwd=tmp)
        try:
            if attempt < kills:
                base = out.stat().st_size if out.exists() else 0
                grow = rng.randint(20_000, 250_000)  # bytes of new output before the kill
                deadline = time.monotonic() + TIMEOUT
                while proc.poll() is None and time.monotonic() < deadline:
                    if (out.stat().st_size if out.exists() else 0) >= base + grow:
                        os.kill(proc.pid, signal.SIGKILL)
                        hits += 1
                        break
                    time.sleep(0.005)
            code = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            proc.stderr.close()
        if code == 0 and attempt >= kills:
            return hits
        assert code in (0, -signal.SIGKILL), f"worker failed with {code}"
    raise AssertionError("the worker did not finish")


def test_restart_after_sigkill_gives_each_output_once_and_equals_an_uninterrupted_run(tmp_path):
    data = records(15_000, seed=4)
    bad = {p: BAD[p % 20] for p in range(3, 15_000, 20) if p % 20 in BAD}  # dead letters all along
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
        write_stream(d / "events.jsonl", data, bad)
    done = worker("run", "--config", str(config(straight, straight / "events.jsonl")), cwd=straight)
    assert done.returncode == 0, done.stderr

    cfg = config(killed, killed / "events.jsonl", checkpoint__every_records=700, limits__batch_size=64)
    hits = run_killed(killed, cfg, kills=3, rng=random.Random(2024))
    assert hits >= 1, "no kill landed on a running worker: the test did not test anything"

    def strip(rows):
        return sorted(({k: v for k, v in r.items() if k != "ts"} for r in rows), key=lambda r: r["position"])

    got = strip(read_jsonl(killed / "out" / "predictions.jsonl"))
    want = strip(read_jsonl(straight / "out" / "predictions.jsonl"))
    positions = [r["position"] for r in got]
    assert len(positions) == len(set(positions)), "a prediction was published twice"
    assert len(got) == len(data)
    assert got == want
    assert strip(read_jsonl(killed / "out" / "dead_letter.jsonl")) == strip(read_jsonl(straight / "out" / "dead_letter.jsonl"))


# -- evaluate, train, check, signals ---------------------------------------------------------------


def test_evaluate_matches_river_progressive_val_score(tmp_path):
    data = records(2000, seed=9)
    write_stream(tmp_path / "events.jsonl", data)
    cfg = str(config(tmp_path, tmp_path / "events.jsonl"))
    js = worker("evaluate", "--config", cfg, "--data", str(tmp_path / "events.jsonl"), "--format", "json", cwd=tmp_path)
    assert js.returncode == 0, js.stderr
    summary = orjson.loads(js.stdout)
    river_acc = evaluate.progressive_val_score(data, plain_model(), metrics.Accuracy()).get()
    assert summary["cumulative"]["accuracy"] == river_acc
    assert summary["records"] == len(data) and summary["dead_letters"] == 0

    table = worker("evaluate", "--config", cfg, "--data", str(tmp_path / "events.jsonl"), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("| accuracy"))
    assert f"{river_acc:12.4f}" in row
    assert "| metric" in table.stdout and "log_loss" in table.stdout
    assert not (tmp_path / "out").exists()  # evaluate publishes nothing


def test_train_then_run_starts_warm(tmp_path):
    history, live = records(3000, seed=5), records(500, seed=6)
    write_stream(tmp_path / "history.jsonl", history)
    write_stream(tmp_path / "live.jsonl", live, start_id=10_000)
    cfg = str(config(tmp_path, tmp_path / "live.jsonl"))
    trained = worker("train", "--config", cfg, "--data", str(tmp_path / "history.jsonl"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert not (tmp_path / "out" / "predictions.jsonl").exists() or not read_jsonl(tmp_path / "out" / "predictions.jsonl")
    ran = worker("run", "--config", cfg, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr

    model = plain_model()
    for x, y in history:
        model.learn_one(x, y)
    want_pred, want_proba = plain_loop(live, model)
    preds = sorted(read_jsonl(tmp_path / "out" / "predictions.jsonl"), key=lambda p: p["position"])
    assert [p["proba"] for p in preds] == want_proba
    assert [p["prediction"] for p in preds] == want_pred
    cold, _ = plain_loop(live)
    assert cold != want_pred  # warm really differs from cold here


def test_config_error_exits_2_naming_the_key(tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    cfg = config(tmp_path, tmp_path / "events.jsonl", telemetry__port="high",
                 )
    for cmd in ("run", "check"):
        done = worker(cmd, "--config", str(cfg), cwd=tmp_path)
        assert done.returncode == 2 and "telemetry.port" in done.stderr, (cmd, done.stderr)
    bad_model = config(tmp_path, tmp_path / "events.jsonl", model__pipeline=[{"linear_model.Nope": {}}])
    done = worker("run", "--config", str(bad_model), cwd=tmp_path)
    assert done.returncode == 2 and "model.pipeline[0].linear_model.Nope" in done.stderr


def test_sigterm_exits_0_with_a_final_checkpoint(tmp_path):
    data = records(3000, seed=3)
    write_stream(tmp_path / "events.jsonl", data)
    # follow: the worker never runs out of input; only the signal stops it. Checkpoints are rare.
    cfg = config(tmp_path, tmp_path / "events.jsonl", source__file__follow=True,
                 checkpoint__every_records=10**9, checkpoint__every_seconds=10**6)
    proc = start("run", "--config", str(cfg), cwd=tmp_path)
    out = tmp_path / "out" / "predictions.jsonl"
    try:
        deadline = time.monotonic() + TIMEOUT
        # every record processed (its prediction is buffered or written): wait on the telemetry-free
        # signal available, the output file after the worker's first flush, then the position
        while proc.poll() is None and time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=TIMEOUT)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
    assert code == 0, err
    snap = tmp_path / "state" / "file_events.jsonl.snapshot"
    assert snap.exists(), err
    header, _ = read_header(snap.read_bytes())
    preds = read_jsonl(out)
    assert header.position == len(preds) > 0  # the snapshot reflects exactly what was published
    assert sorted(p["position"] for p in preds) == list(range(len(preds)))


def test_a_second_sigterm_ends_a_stop_that_waits_for_a_learner_that_does_not_answer(tmp_path):
    """The learner process is frozen (SIGSTOP): the clean stop waits for it; a second signal exits 1 at once."""
    data = records(3000, seed=3)
    write_stream(tmp_path / "events.jsonl", data)
    cfg = config(tmp_path, tmp_path / "events.jsonl", source__file__follow=True)
    proc = start("run", "--config", str(cfg), cwd=tmp_path)
    out = tmp_path / "out" / "predictions.jsonl"
    learner = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.02)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        learner = next(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())
        os.kill(learner, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # the clean stop waits for the frozen learner
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if learner is not None:  # (it holds the other end of the worker's stderr too)
            with contextlib.suppress(ProcessLookupError):
                os.kill(learner, signal.SIGKILL)
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert code == 1 and "second SIGTERM" in err, err
