"""`cicw-stream serve` as a real process for end-to-end tests: start it, wait until it is ready,
kill it (SIGKILL, as a crash would) and start it again on the same state."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, data_dir: Path, tokens: str, *, ray_num_cpus: int = 2, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self._args = args
        self._env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tokens = tokens
        self._cpus = ray_num_cpus
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "serve.log"

    def start(self, *, ready_timeout_s: float = 120.0) -> ServiceProcess:
        env = {**os.environ, "CICW_API_TOKENS": self._tokens, **self._env}
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--ray-num-cpus", str(self._cpus), *self._args], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"cicw-stream serve exited with {self._proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"cicw-stream serve not ready after {ready_timeout_s} s: {self.log()}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it: no shutdown code runs."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
