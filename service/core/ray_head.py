"""The Ray head that ``cicw-stream serve`` runs its jobs on when no ``--ray-address`` is given.

A Ray started by ``ray.init()`` inside the API process dies with it, and so would every job. This
head is a process tree of its own (``ray start --head``, which daemonises): jobs outlive the API,
and a restarted API finds the same head again through ``<state_dir>/ray-head.json``.

Which processes are this head's: Ray's ``ray stop`` cannot target one head (it ends every Ray on
the machine), so :func:`stop_local_head` ends exactly the processes of this head's temp dir: those
whose command line names the dir (gcs_server, raylet, monitor, dashboard, log monitor), those
whose stdout or stderr is a log file in it (workers and agents, which Ray retitles ``ray::...``),
and their descendants. The process group is not used: ``ray start`` exits once the head runs, and
its group id may later be reused by an unrelated process. Process discovery reads ``/proc``
(Linux, where Ray clusters run).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from workers.errors import RayClusterError

log = logging.getLogger(__name__)

STATE_FILE = "ray-head.json"
LOG_FILE = "ray-head.log"  # what `ray start` printed; Ray's own logs are in the temp dir
_LOCK_FILE = "ray-head.lock"
# A head that accepts no connection within this long is taken for dead.
_REUSE_PROBE_S = 2.0
# How long connect() gives a named cluster to accept a TCP connection.
_CONNECT_PROBE_S = 5.0
# Ray's daemons outlast SIGTERM (measured: gcs_server, raylet, monitor and the runtime-env agent
# still ran 10 s after it). A stopped head is discarded (its GCS state is in memory, its jobs die
# with it), so a short grace is enough before SIGKILL.
_TERM_GRACE_S = 1.0
_KILL_WAIT_S = 5.0


class HeadRecord(BaseModel):
    """What ``ray-head.json`` holds about the running head."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    address: str  # 127.0.0.1:PORT of its GCS
    pid: int  # the gcs_server process: the head lives as long as it does
    started_at: datetime


def head_temp_dir(state_dir: Path) -> Path:
    """The Ray temp dir of the head kept in ``state_dir``: short, because Ray puts unix sockets
    under it and a socket path may not exceed ~107 bytes; unique per state dir."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"cicw-ray-{digest}"


def read_head_record(state_dir: Path) -> HeadRecord | None:
    """The recorded head, or None when there is no usable record (missing or unreadable file)."""
    try:
        return HeadRecord.model_validate_json((Path(state_dir) / STATE_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


def ensure_local_head(state_dir: Path, *, num_cpus: int | None = None, timeout_s: float = 60) -> str:
    """The GCS address ("127.0.0.1:PORT") of the local head recorded in ``state_dir``, started if
    needed.

    The recorded head is reused while its gcs_server runs and accepts connections; otherwise the
    processes left in its temp dir are ended (a half-dead head would make the new one fail with
    "Session name ... does not match persisted value") and a new head is started on a free port
    and recorded. ``num_cpus`` applies to a newly started head only. Raises RayClusterError naming
    the cause and the log file when the head does not start within ``timeout_s``.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = head_temp_dir(state_dir)
    with _locked(state_dir):
        record = read_head_record(state_dir)
        if record is not None and _is_alive(record, temp_dir):
            return record.address
        if record is not None:
            log.warning("the Ray head recorded in %s (%s, pid %d) is gone; starting a new one",
                        state_dir / STATE_FILE, record.address, record.pid)
        _end_processes(temp_dir)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        _prune_sessions(temp_dir)
        record = _start_head(state_dir, temp_dir, num_cpus=num_cpus, timeout_s=timeout_s)
        _write_atomically(state_dir / STATE_FILE, record.model_dump_json(indent=2) + "\n")
        return record.address


def stop_local_head(state_dir: Path) -> None:
    """End the head recorded in ``state_dir`` (only its processes, see the module's docstring) and
    forget it. A head already gone is no error; its log files are kept in its temp dir."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return
    with _locked(state_dir):
        _end_processes(head_temp_dir(state_dir))
        (state_dir / STATE_FILE).unlink(missing_ok=True)


def connect(address: str, namespace: str = "cicw-stream") -> None:
    """Join the Ray cluster at ``address`` as a driver in ``namespace``, unless Ray is already
    initialised in this process. Raises RayClusterError, naming the address, when nothing answers
    there or Ray cannot join it."""
    import ray

    if ray.is_initialized():
        return
    _probe(address, _CONNECT_PROBE_S)
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise RayClusterError(f"cannot join the Ray cluster at {address!r}: {exc}") from exc


# --- starting -------------------------------------------------------------------------------------


def _start_head(state_dir: Path, temp_dir: Path, *, num_cpus: int | None, timeout_s: float) -> HeadRecord:
    ray_exe = Path(sys.executable).parent / "ray"
    if not ray_exe.is_file():
        raise RayClusterError(f"no `ray` executable next to {sys.executable} (is ray installed in this environment?)")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Without --node-ip-address 127.0.0.1 the head may refuse a 127.0.0.1 address.
    cmd = [str(ray_exe), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    log_path = state_dir / LOG_FILE
    deadline = time.monotonic() + timeout_s
    # Ray 2.60's `ray start` turns token authentication on whenever ~/.ray/auth_token exists (any
    # local ray.init() writes one), while ray.init(address=...) only sends a token when
    # RAY_AUTH_MODE=token is set: with the mode unset, the head and its clients could disagree.
    # So the mode is this process's RAY_AUTH_MODE when set (clients started with the same
    # environment match it), and "disabled" otherwise, as for a `ray start` without a token.
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    with open(log_path, "wb") as out:
        # A session of its own: a Ctrl-C of the API (its process group) must not reach the head.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        _end_processes(temp_dir)
        raise RayClusterError(f"`ray start` did not return within {timeout_s:g} s; "
                              f"see {log_path} and {temp_dir}/session_latest/logs") from None
    if rc != 0:
        _end_processes(temp_dir)  # a failed start can leave a gcs_server that spoils the next one
        raise RayClusterError(f"`ray start` failed (exit status {rc}): {_last_line(log_path)}; see {log_path}")
    while True:
        try:
            _probe(address, 1.0)
            break
        except RayClusterError as exc:
            if time.monotonic() > deadline:
                _end_processes(temp_dir)
                raise RayClusterError(f"the Ray head started by `ray start` does not answer at {address} "
                                      f"within {timeout_s:g} s; see {log_path}") from exc
            time.sleep(0.2)
    gcs = [p.pid for p in _processes() if p.argv0_name == "gcs_server" and str(temp_dir) in p.cmdline]
    if not gcs:
        _end_processes(temp_dir)
        raise RayClusterError(f"the Ray head at {address} has no gcs_server process of {temp_dir}; see {log_path}")
    log.info("started a Ray head at %s (temp dir %s, log %s)", address, temp_dir, log_path)
    return HeadRecord(address=address, pid=gcs[0], started_at=datetime.now(UTC))


def _is_alive(record: HeadRecord, temp_dir: Path) -> bool:
    """The recorded gcs_server still runs (the pid is not reused by another process) and accepts
    connections."""
    proc = _process(record.pid)
    if proc is None or proc.zombie or str(temp_dir) not in proc.cmdline:
        return False
    try:
        _probe(record.address, _REUSE_PROBE_S)
    except RayClusterError:
        return False
    return True


def _probe(address: str, timeout_s: float) -> None:
    # Imported here: workers.runner loads torch, which importing this module should not.
    from workers.runner import probe_ray_address

    probe_ray_address(address, timeout_s=timeout_s)


def _free_port() -> int:
    # The GCS listens on every interface, so the port must be free on all of them.
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune_sessions(temp_dir: Path, keep: int = 1) -> None:
    """Delete the session folders of old heads but the newest ``keep`` (the last head's logs stay
    for a post-mortem; each start would otherwise add one forever)."""
    sessions = sorted((p for p in temp_dir.glob("session_2*") if p.is_dir() and not p.is_symlink()),
                      key=lambda p: p.stat().st_mtime)
    for old in sessions[:-keep] if keep else sessions:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise start and stop of the head of one state dir across processes (two API processes
    started together must not start two heads)."""
    with open(state_dir / _LOCK_FILE, "a") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


# --- the head's processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    zombie: bool
    cmdline: str
    outputs: tuple[str, ...]  # where its stdout and stderr go

    @property
    def argv0_name(self) -> str:
        return Path(self.cmdline.split(" ", 1)[0]).name


def _process(pid: int) -> _Proc | None:
    base = Path("/proc") / str(pid)
    try:
        stat = (base / "stat").read_text()
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # gone, or not ours to read
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    outputs = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            outputs.append(os.readlink(base / "fd" / str(fd)))
    return _Proc(pid=pid, ppid=int(fields[1]), zombie=fields[0] in ("Z", "X"), cmdline=cmdline,
                 outputs=tuple(outputs))


def _processes() -> list[_Proc]:
    try:
        entries = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError as exc:
        raise RayClusterError("the embedded Ray head needs /proc (Linux) to tell its processes apart; "
                              "elsewhere, start Ray yourself and give its address") from exc
    procs = (_process(pid) for pid in entries)
    return [p for p in procs if p is not None]


def _head_processes(temp_dir: Path) -> list[_Proc]:
    """The live processes of the head whose temp dir is ``temp_dir`` (see the module docstring)."""
    # The dir itself or a path under it, not a longer name that starts the same.
    names_dir = re.compile(re.escape(str(temp_dir)) + r"(?![\w.-])").search
    procs = [p for p in _processes() if not p.zombie and p.pid != os.getpid()]
    members = {p.pid for p in procs if names_dir(p.cmdline) or any(names_dir(o) for o in p.outputs)}
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return [p for p in procs if p.pid in members]


def _end_processes(temp_dir: Path) -> None:
    """SIGTERM the head's processes, SIGKILL those still there after a grace period; repeated
    while new ones appear (a raylet may spawn a worker while it is being stopped)."""
    for _ in range(3):
        procs = _head_processes(temp_dir)
        if not procs:
            return
        log.info("ending %d processes of the Ray head in %s", len(procs), temp_dir)
        pids = {p.pid for p in procs}
        _signal(pids, signal.SIGTERM)
        pids = _wait_gone(pids, _TERM_GRACE_S)
        _signal(pids, signal.SIGKILL)
        pids = _wait_gone(pids, _KILL_WAIT_S)
        if pids:
            raise RayClusterError(f"processes {sorted(pids)} of the Ray head in {temp_dir} survived SIGKILL")
    if left := _head_processes(temp_dir):
        raise RayClusterError(f"the Ray head in {temp_dir} keeps starting processes: {[p.pid for p in left]}")


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    """The pids still running (zombies count as gone) after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {pid for pid in pids if (p := _process(pid)) is not None and not p.zombie}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
