"""``cpu_affinity``: which CPU the learner process gets, and that the processes really run there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from worker.affinity import Split, plan
from worker.config import load_settings
from worker.errors import ConfigError


@pytest.mark.parametrize(
    ("policy", "allowed", "online", "expected"),
    [
        ("none", {0, 1, 2, 3}, 8, None),
        ("split", {0, 1}, 2, Split(1, frozenset({0}))),
        ("split", {0, 2, 5}, 8, Split(5, frozenset({0, 2}))),
        ("split", {3}, 8, None),  # one CPU: nothing to split
        ("auto", {0, 1}, 2, None),  # every CPU of the machine: they may be shared
        ("auto", {4, 5}, 16, Split(5, frozenset({4}))),  # a cpuset: the CPUs were allotted
        ("auto", {4}, 16, None),
    ],
)
def test_the_plan(policy, allowed, online, expected):
    assert plan(policy, allowed=allowed, online=online) == expected


def test_an_unknown_policy_stops_start_up_naming_the_key():
    with pytest.raises(ConfigError, match="cpu_affinity"):
        load_settings(data={"cpu_affinity": "half"}, env={})


# Run in a child interpreter: pinning is process-wide, and this test process must keep its CPUs.
_PROBE = """
import json, os, sys
from worker.config import load_settings
from worker.learner import LearnerConfig, ProcessLearners
before = sorted(os.sched_getaffinity(0))
host = ProcessLearners(LearnerConfig(load_settings(data={"cpu_affinity": sys.argv[1]}, env={})))
host.ready()
def cpus(pid):
    return sorted({c for t in os.listdir(f"/proc/{pid}/task") for c in os.sched_getaffinity(int(t))})
during = {"worker": cpus(os.getpid()), "learner": cpus(host.pid)}
host.close()
print(json.dumps({"before": before, "during": during, "after": cpus(os.getpid())}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"),
                    reason="CPU affinity is a Linux feature")
@pytest.mark.parametrize("policy", ["split", "none"])
def test_the_learner_process_and_the_worker_run_where_the_plan_says(policy):
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = got["before"]
    expected = plan(policy, allowed=set(allowed), online=os.cpu_count())
    if expected is None:  # (also split on a one-CPU machine)
        assert got["during"] == {"worker": allowed, "learner": allowed}
    else:  # every thread of each process, librdkafka's and the learner's pipe reader too
        assert got["during"] == {"worker": sorted(expected.worker), "learner": [expected.learner]}
    assert got["after"] == allowed  # closing the learner gives this process its CPUs back
