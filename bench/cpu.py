"""Where the CPU goes during a run: per process and thread, from ``/proc`` (Linux only).

    with CpuSampler(roles={broker_pid: "broker"}) as cpu:
        ...                                  # the run
    for row in cpu.breakdown(start, end):    # wall-clock (time.time()) window of the run
        print(row)

A thread samples the CPU time (user + system) of every thread of this process and of its
children every ``interval`` seconds, so a window can be cut out of a run afterwards (the
benchmarks time from the first consumed record, not from the start-up). Threads are grouped
by role (``main``: this process; ``child``: any child not named in ``roles``) and thread
name (``python3``, librdkafka's ``rdk:broker…``, tansu's ``tokio-rt-worker``). The
resolution is the kernel's clock tick (10 ms): cut windows of a second or more. A process
that ends inside a window is not counted in it (its threads are gone at the window's end).

>>> import time
>>> with CpuSampler(interval=0.01) as cpu:
...     t = time.time()
...     while time.time() - t < 0.3: pass
>>> rows = cpu.breakdown(t, time.time())
>>> rows[0]["role"], rows[0]["cpu_s"] > 0.1
('main', True)
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _threads(pid: int) -> dict[tuple[int, str, str], float]:
    """{(pid, tid, thread name): CPU seconds} of one process (empty if it is gone)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[(pid, tid, name)] = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


class CpuSampler:
    """Samples this process's and its children's per-thread CPU time in a background thread."""

    def __init__(self, interval: float = 0.05, roles: dict[int, str] | None = None):
        if not os.path.isdir(f"/proc/{os.getpid()}/task"):
            raise RuntimeError("CPU sampling needs Linux's /proc")
        self.interval = interval
        self.roles = dict(roles or {})
        self._samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        now: dict = {}
        for pid in [me, *_children(me)]:
            now.update(_threads(pid))
        self._samples.append((time.time(), now))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _at(self, t: float) -> dict:
        return min(self._samples, key=lambda s: abs(s[0] - t))[1]

    def breakdown(self, start: float, end: float) -> list[dict]:
        """CPU seconds per (role, thread name) between two ``time.time()`` instants, largest first,
        with ``share``: that CPU time over the window's wall time (1.0 = one core)."""
        before, after = self._at(start), self._at(end)
        wall = max(end - start, 1e-9)
        me = os.getpid()
        totals: dict[tuple[str, str], float] = {}
        for (pid, tid, name), cpu in after.items():
            used = cpu - before.get((pid, tid, name), 0.0)
            if used <= 0:
                continue
            role = "main" if pid == me else self.roles.get(pid, "child")
            totals[(role, name)] = totals.get((role, name), 0.0) + used
        rows = [{"role": r, "thread": n, "cpu_s": c, "share": c / wall} for (r, n), c in totals.items()]
        return sorted(rows, key=lambda row: -row["cpu_s"])
