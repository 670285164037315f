"""bench.cpu: CPU time is attributed to the right process, role and window."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.cpu import CpuSampler


def _spin(seconds: float) -> None:
    t = time.time()
    while time.time() - t < seconds:
        pass


@pytest.mark.timeout(30)
def test_children_get_their_roles_and_idle_windows_get_nothing():
    with CpuSampler(interval=0.02) as cpu:
        idle_from = time.time()
        time.sleep(0.4)
        idle_to = time.time()
        named = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.8: pass"])
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.8)"])
        cpu.roles[named.pid] = "broker"
        busy_from = time.time()
        _spin(0.5)
        busy_to = time.time()
        time.sleep(0.05)  # a sample after busy_to, while both children still run
        named.wait()
        other.wait()
    idle = {(r["role"], r["thread"]): r["cpu_s"] for r in cpu.breakdown(idle_from, idle_to)}
    assert sum(idle.values()) < 0.1, idle
    busy = cpu.breakdown(busy_from, busy_to)
    main = sum(r["cpu_s"] for r in busy if r["role"] == "main")
    assert main >= 0.3, busy
    assert all(r["share"] <= 1.5 for r in busy if r["role"] == "main"), busy  # one thread spins: ~1 core
    roles = {r["role"]: r["cpu_s"] for r in busy}
    assert roles.get("broker", 0.0) >= 0.25, busy  # the spinning child, by the role it was given
    assert roles.get("child", 0.0) < 0.2, busy  # the sleeping one, unnamed
