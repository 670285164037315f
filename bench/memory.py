"""Resident memory of benchmark processes (Linux ``/proc``), in MB (2**20 bytes).

``peak_mb`` reads VmHWM, a process's own high-water mark (``ru_maxrss`` would keep the
parent's peak across ``exec``, and for children it only covers the ones waited for).
:class:`PeakSampler` follows another process, e.g. the worker's learner process, whose peak
is gone once it exits.
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def rss_mb() -> float:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def built(make: Callable[[], T]) -> tuple[T, float]:
    """``make()`` and the resident memory its result added (MB): what a measurement holds
    only as its input (e.g. pre-decoded records), to subtract from its peak."""
    before = rss_mb()
    value = make()
    return value, rss_mb() - before


def peak_mb(pid: int | str = "self") -> float:
    """A process's peak resident set so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


class PeakSampler:
    """The peak resident set of process ``pid`` while the ``with`` block runs (``.peak_mb``),
    read every ``interval`` seconds until the block ends or the process is gone: growth in the
    last interval before it exits is missed."""

    def __init__(self, pid_of, interval: float = 0.02):
        self._pid_of = pid_of  # a callable: the pid may not be known when the sampler starts
        self._interval = interval
        self._done = threading.Event()
        self.peak_mb: float | None = None
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            pid = self._pid_of()
            if pid is not None:
                try:
                    self.peak_mb = max(self.peak_mb or 0.0, peak_mb(pid))
                except (OSError, RuntimeError):  # gone (or a zombie: no VmHWM line)
                    return
            if self._done.wait(self._interval):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
