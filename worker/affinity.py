"""CPU affinity of ``worker run``'s two processes (``cpu_affinity``).

The learner process is the worker's bottleneck: it learns on one core while the worker
process decodes, watches, encodes and talks to the broker on another. Left to the
scheduler, the worker's threads (its main thread and librdkafka's) and other processes
keep landing on the learner's core and taking turns with it. ``split`` gives the learner
one CPU of its own (the last one the process may use) and the worker's threads the
others; on these 2-core machines that made the learner ~7 % faster per record (see
docs/kafka.md, performance notes).

It only pays where the worker has its CPUs to itself: a Kubernetes pod of the Guaranteed
class with whole CPUs under the static CPU manager, ``docker run --cpuset-cpus``, a host
or VM of its own. ``auto`` (the default) splits when the process was confined to a
strict subset of the machine's CPUs (the sign that someone allotted them), ``none``
never.

>>> plan("split", allowed={0, 1}, online=2)
Split(learner=1, worker=frozenset({0}))
>>> plan("auto", allowed={0, 1}, online=2) is None  # every CPU of the machine: maybe shared
True
>>> plan("auto", allowed={4, 5, 6}, online=16)
Split(learner=6, worker=frozenset({4, 5}))
>>> plan("split", allowed={3}, online=8) is None  # one CPU: nothing to split
True
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Split(NamedTuple):
    learner: int  #: the learner process's CPU
    worker: frozenset[int]  #: the worker process's CPUs


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on, or None where the platform does not say (not Linux)."""
    getter = getattr(os, "sched_getaffinity", None)
    return None if getter is None else set(getter(0))


def plan(policy: str, allowed: set[int] | None = None, online: int | None = None) -> Split | None:
    """Which CPU the learner gets and which the worker keeps under ``policy``, or None for no pinning.

    ``allowed`` defaults to this process's CPUs, ``online`` to the machine's count.
    """
    if policy == "none":
        return None
    allowed = allowed_cpus() if allowed is None else allowed
    if allowed is None or len(allowed) < 2:
        return None
    online = (os.cpu_count() or 0) if online is None else online
    if policy == "auto" and len(allowed) >= online:
        return None
    cpus = sorted(allowed)
    return Split(cpus[-1], frozenset(cpus[:-1]))


def pin_process(cpus: set[int] | frozenset[int]) -> None:
    """Restrict every thread of this process to ``cpus``; threads started later inherit it.

    (``sched_setaffinity(0, ...)`` alone moves only the calling thread on Linux, and the
    client libraries' threads are already running.)
    """
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
