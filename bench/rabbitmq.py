"""The worker on RabbitMQ beside a plain asynchronous pika loop, both as ratios of the plain river loop.

    python -m bench.rabbitmq [--records 20000] [--repeat 3] [--url AMQP_URL] [--pika-prefetch 1000]
                             [--learner process|inline] [--cpu] [--json PATH]

One RabbitMQ node (``tests.brokers.RabbitMQ``, or ``--url``) for the whole run. Each
repetition fills two fresh queues with the same Agrawal records (``{"id", "x", "y"}``
JSON, persistent): a plain durable queue for the pika loop, and the worker's shard queue
``EX.0``, published through its ``x-consistent-hash`` exchange ``EX`` with the record id
as the routing key (with one shard every key lands in ``EX.0``). It then runs, each
contender in a child process of its own: the plain river loop, the pika loop
(:mod:`bench.pika_loop`), the plain loop, the worker (:mod:`bench.worker_rabbitmq`,
``delivery: at_least_once``, 1 shard queue, file snapshots every 10,000 records that ack
what they cover), the plain loop. Each contender's ratio is taken against the mean of the
plain loops right before and right after it (see :mod:`bench.contenders`), and the goal's
figure, worker / pika loop, repetition by repetition. Both are timed from their first
delivery to the ack that covers the last record (its outputs confirmed by the broker).
Queues are deleted after each repetition. Before the first, 2,000 records go through the
fresh node once, untimed (:func:`_warm_up`).

With ``--cpu`` each run also prints where the CPU went in its window: the contender's
threads (``main``, pika's I/O thread ``rabbitmq-io``), the worker's learner process and the
broker's Erlang threads, in µs per record and in cores (:mod:`bench.cpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench import harness as h
from bench.common import agrawal, pin_hash_seed, plain_loop, summary
from bench.cpu import CpuSampler, _children, _threads

#: name -> what the table calls it.
CONTENDERS = {
    "pika_loop": "plain asynchronous pika loop (confirms, acks)",
    "worker_rabbitmq": "this worker, RabbitMQ at-least-once (1 shard queue)",
}
#: The pika loop's prefetch (unacked deliveries). Its acks follow the confirms closely:
#: 300 was ~20 % slower here, 1,000, 5,000 and 15,000 as fast as one another (bench/README.md).
PIKA_PREFETCH = 1000
#: Fill a queue without waiting for confirms; the queue's depth is awaited instead.
FILL_TIMEOUT = 120.0
#: Records sent through a fresh node before the first repetition (untimed).
WARM_UP = 2_000


@contextlib.contextmanager
def broker() -> Iterator[tuple[str, int | None]]:
    """A throw-away RabbitMQ node on 127.0.0.1: yields (AMQP URL, its pid). Raises
    ``tests.brokers.BrokerUnavailable`` when it cannot be started."""
    sys.path.insert(0, str(h.REPO))
    from tests.brokers import RabbitMQ

    node = RabbitMQ()
    try:
        node.start()
        yield node.url, node.pid
    finally:
        with contextlib.suppress(Exception):
            node.stop()
        node.cleanup()


def _connection(url: str):
    import pika

    return pika.BlockingConnection(pika.URLParameters(url))


def fill(url: str, values: list[bytes], *, queue: str | None = None, exchange: str | None = None,
         shards: int = 1) -> None:
    """Publish ``values`` persistent to a fresh durable ``queue``, or through the worker's
    ``exchange`` (declared with its shard queues as the worker declares them; routing key:
    the record's index), and wait until the queue(s) hold them all."""
    import pika

    from worker.transports.rabbitmq import declare_topology, shard_queues

    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    if exchange is not None:
        queues = shard_queues(exchange, shards)
        declare_topology(url, exchange, queues, [])
    else:
        queues = [queue]
    conn = _connection(url)
    try:
        ch = conn.channel()
        if exchange is None:
            ch.queue_declare(queue, durable=True)
            for value in values:
                ch.basic_publish("", queue, value, props)
        else:
            for i, value in enumerate(values):
                ch.basic_publish(exchange, str(i), value, props)
        deadline = time.monotonic() + FILL_TIMEOUT
        while sum(ch.queue_declare(q, passive=True).method.message_count for q in queues) < len(values):
            if time.monotonic() > deadline:
                raise h.ChildFailed(f"RabbitMQ did not take {len(values)} records into {queues} in time")
            conn.sleep(0.05)
    finally:
        conn.close()


def delete(url: str, queues: list[str], exchanges: list[str] = ()) -> None:
    conn = _connection(url)
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_delete(q)
        for ex in exchanges:
            ch.exchange_delete(ex)
    finally:
        conn.close()


class TreeCpuSampler(CpuSampler):
    """:class:`bench.cpu.CpuSampler` over every descendant (the worker's learner is a
    grandchild); a descendant not named in ``roles`` takes its parent's role + ``/child``."""

    def _sample(self) -> None:
        now: dict = {}
        stack = [os.getpid()]
        while stack:
            pid = stack.pop()
            now.update(_threads(pid))
            for child in _children(pid):
                if child not in self.roles and pid in self.roles:
                    self.roles[child] = f"{self.roles[pid]}/child"
                stack.append(child)
        self._samples.append((time.time(), now))


def _command(name: str, url: str, n: int, tag: str, workdir: Path, pika_prefetch: int,
             learner: str | None) -> tuple[list[str], list[str], list[str]]:
    """(child command, queues to delete after it, exchanges to delete after it)."""
    if name == "pika_loop":
        queue, out = f"{tag}-in", f"{tag}-out"
        conn = _connection(url)
        try:
            conn.channel().queue_declare(out, durable=True)
        finally:
            conn.close()
        return (h.python_cmd("bench.pika_loop", "--url", url, "--queue", queue, "--out", out, "--records", str(n),
                             "--prefetch", str(pika_prefetch)), [queue, out], [])
    exchange = f"{tag}-in"
    from worker.transports.rabbitmq import shard_queues

    cmd = h.python_cmd("bench.worker_rabbitmq", "--url", url, "--exchange", exchange, "--tag", tag, "--records", str(n),
                       "--store", str(workdir / tag), *(["--learner", learner] if learner else []))
    return cmd, [*shard_queues(exchange, 1), *h.outputs(tag).values()], [exchange]


def measure(url: str, records: list, values: list[bytes], repeat: int, log: Callable[[str], None],
            pika_prefetch: int = PIKA_PREFETCH, learner: str | None = None, timeout: float = 300.0,
            cpu_roles: dict[int, str] | None = None) -> dict:
    """``{"rows": [pika_loop row, worker row], "worker_over_pika": [...], "cpu": {...}}`` on a
    running broker; rows as :func:`bench.contenders.measure` makes them (broker ``rabbitmq``)."""
    n = len(records)
    rows = {name: {"contender": name, "label": CONTENDERS[name], "broker": "rabbitmq", "records": n, "rates": [],
                   "ratios": [], "plain_rates": [], "errors": []} for name in CONTENDERS}
    over: list[float] = []
    cpu: dict[str, list[list[dict]]] = {name: [] for name in CONTENDERS}
    workdir = Path(tempfile.mkdtemp(prefix="bench-rabbitmq-"))
    _warm_up(url, values[:WARM_UP], workdir, pika_prefetch, timeout, log)
    for rep in range(repeat):
        tags = {name: h.unique(name.replace("_", "-")) for name in CONTENDERS}
        fill(url, values, queue=f"{tags['pika_loop']}-in")
        fill(url, values, exchange=f"{tags['worker_rabbitmq']}-in")
        before = plain_loop(records)
        rates: dict[str, float] = {}
        for name in CONTENDERS:
            row = rows[name]
            cmd, queues, exchanges = _command(name, url, n, tags[name], workdir, pika_prefetch, learner)
            try:
                with contextlib.ExitStack() as stack:
                    sampler = stack.enter_context(TreeCpuSampler(roles=cpu_roles)) if cpu_roles is not None else None
                    proc = h.start(cmd, workdir / f"{name}.log")
                    if sampler is not None:
                        sampler.roles[proc.pid] = name
                    res = h.finish(proc, timeout)
                if res["seconds"] is None:
                    raise h.ChildFailed(f"{name} timed nothing")
            except h.ChildFailed as exc:
                row["errors"].append(str(exc))
                log(f"  rabbitmq {name} #{rep + 1}: FAILED ({exc}; log {workdir / f'{name}.log'})")
                before = plain_loop(records)
                continue
            finally:
                with contextlib.suppress(Exception):
                    delete(url, queues, exchanges)
            after = plain_loop(records)
            plain, before = (before + after) / 2, after
            rates[name] = res["records"] / res["seconds"]
            row["rates"].append(rates[name])
            row["plain_rates"].append(n / plain)
            row["ratios"].append(rates[name] / (n / plain))
            log(f"  rabbitmq {name} #{rep + 1}: {rates[name]:,.0f} rec/s = {row['ratios'][-1]:.2f} of the plain loop")
            if sampler is not None:
                breakdown = sampler.breakdown(res["first"], res["end"])
                cpu[name].append(breakdown)
                print_cpu(name, n, res["seconds"], breakdown, log)
        if len(rates) == len(CONTENDERS):
            over.append(rates["worker_rabbitmq"] / rates["pika_loop"])
            log(f"  rabbitmq #{rep + 1}: worker / pika loop = {over[-1]:.2f}")
    if not any(row["errors"] for row in rows.values()):  # (else kept: the failures' logs are there)
        shutil.rmtree(workdir, ignore_errors=True)
    out = {"records": n, "repeat": repeat, "pika_prefetch": pika_prefetch, "rows": list(rows.values()),
           "worker_over_pika": over, "error": None}
    if cpu_roles is not None:
        out["cpu"] = cpu
    return out


def _warm_up(url: str, values: list[bytes], workdir: Path, pika_prefetch: int, timeout: float,
             log: Callable[[str], None]) -> None:
    """Records through a fresh node once, untimed (the pika loop on a queue of its own), so
    that the first contender of the first repetition does not pay for the node's first
    queues, message store files and connections alone."""
    tag = h.unique("warm-up")
    fill(url, values, queue=f"{tag}-in")
    cmd, queues, exchanges = _command("pika_loop", url, len(values), tag, workdir, pika_prefetch, None)
    try:
        h.run(cmd, timeout, workdir / "warm-up.log")
    except h.ChildFailed as exc:  # (the repetitions will say what fails)
        log(f"  rabbitmq warm-up: FAILED ({exc})")
    finally:
        delete(url, queues, exchanges)


def not_measured(n: int, why: str) -> dict:
    rows = [{"contender": name, "label": label, "broker": "rabbitmq", "records": n, "rates": [], "ratios": [],
             "plain_rates": [], "errors": [why]} for name, label in CONTENDERS.items()]
    return {"records": n, "pika_prefetch": PIKA_PREFETCH, "rows": rows, "worker_over_pika": [], "error": why}


def section(records: list, values: list[bytes], repeat: int, log: Callable[[str], None], **kwargs) -> dict:
    """The suite's ``rabbitmq`` section: start a node, :func:`measure`, stop it. A node that
    cannot be started makes the rows say "not measured" with the reason, except under
    ``CI=true``, where it is an error (CI must not go green without its broker)."""
    sys.path.insert(0, str(h.REPO))
    from tests.brokers import BrokerUnavailable

    with contextlib.ExitStack() as stack:
        try:
            url, _pid = stack.enter_context(broker())
        except (BrokerUnavailable, OSError) as exc:
            if os.environ.get("CI", "").lower() == "true":
                raise
            log(f"  RabbitMQ not started: {exc}")
            first = (str(exc).splitlines() or [""])[0]  # (a failed start appends the node's log)
            return not_measured(len(records), f"RabbitMQ not started ({first})")
        return measure(url, records, values, repeat, log, **kwargs)


def print_cpu(label: str, n: int, wall: float, rows: list[dict], out: Callable[[str], None] = print) -> None:
    out(f"  {label}: {wall * 1e6 / n:.1f} µs/record wall, CPU by process and thread:")
    for r in rows:
        out(f"    {r['role']:<24} {r['thread'][:18]:<18} {r['cpu_s'] * 1e6 / n:7.2f} µs/record  {r['share']:.2f} cores")
    out(f"    {'total':<43} {sum(r['cpu_s'] for r in rows) * 1e6 / n:7.2f} µs/record  "
        f"{sum(r['share'] for r in rows):.2f} cores")


def main() -> None:
    pin_hash_seed("bench.rabbitmq")
    h.interruptible()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", help="an existing broker (default: start one, tests.brokers.RabbitMQ)")
    parser.add_argument("--pika-prefetch", type=int, default=PIKA_PREFETCH, help="the pika loop's prefetch")
    parser.add_argument("--learner", choices=["process", "inline"], help="the worker's learner (default: the worker's)")
    parser.add_argument("--cpu", action="store_true", help="print each run's CPU by process and thread (Linux)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    records = agrawal(args.records)
    values = h.encode(records)
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url, None
        else:
            url, pid = stack.enter_context(broker())
        roles = None if not args.cpu else ({} if pid is None else {pid: "broker"})
        res = measure(url, records, values, args.repeat, log, args.pika_prefetch, args.learner, cpu_roles=roles)
    pika, worker = res["rows"]
    plain = [r for row in res["rows"] for r in row["plain_rates"]]
    print(f"{args.records:,} records, {args.repeat} repetition(s); median (min-max)")
    if plain:
        print(f"plain river loop: {statistics.median(plain):,.0f} rec/s")
    for row in (pika, worker):
        if row["rates"]:
            s, r = summary(row["rates"]), summary(row["ratios"])
            print(f"{row['label']:<52} {s['median']:8,.0f} rec/s   ratio to the plain loop {r['median']:.3f} "
                  f"({r['min']:.3f}-{r['max']:.3f})")
        else:
            print(f"{row['label']:<52} not measured: {'; '.join(row['errors'][:1])}")
    if res["worker_over_pika"]:
        s = summary(res["worker_over_pika"])
        print(f"worker / pika loop: {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}), goal >= 0.9")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
