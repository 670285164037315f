"""bench.cpu: CPU time is attributed to the right process, role and window.

The scenario runs in a fresh interpreter, so that nothing else of the test session (a
broker it started, client threads of earlier tests) is a child or a thread of the process
whose CPU is sampled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = r'''
import json, subprocess, sys, time
from bench.cpu import CpuSampler

def spin(seconds):
    t = time.time()
    while time.time() - t < seconds:
        pass

with CpuSampler(interval=0.02) as cpu:
    idle_from = time.time()
    time.sleep(0.4)
    idle_to = time.time()
    named = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.8: pass"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.8)"])
    cpu.roles[named.pid] = "broker"
    busy_from = time.time()
    spin(0.5)
    busy_to = time.time()
    time.sleep(0.05)  # a sample after busy_to, while both children still run
    named.wait()
    other.wait()
print(json.dumps({"idle": cpu.breakdown(idle_from, idle_to), "busy": cpu.breakdown(busy_from, busy_to)}))
'''


@pytest.mark.timeout(60)
def test_children_get_their_roles_and_idle_windows_get_nothing():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCENARIO], cwd=root, capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    idle = {(r["role"], r["thread"]): r["cpu_s"] for r in result["idle"]}
    assert sum(idle.values()) < 0.1, idle
    busy = result["busy"]
    main = sum(r["cpu_s"] for r in busy if r["role"] == "main")
    assert main >= 0.3, busy
    assert all(r["share"] <= 1.5 for r in busy if r["role"] == "main"), busy  # one thread spins: ~1 core
    roles = {r["role"]: r["cpu_s"] for r in busy}
    assert roles.get("broker", 0.0) >= 0.25, busy  # the spinning child, by the role it was given
    assert roles.get("child", 0.0) < 0.2, busy  # the sleeping one, unnamed
