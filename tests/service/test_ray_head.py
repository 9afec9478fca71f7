"""The service's own Ray head, through real `ray start` heads in temporary state dirs: started,
reused while it answers, stopped (only its own processes), replaced when its record is unusable,
and a failed start that names its log and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.core.ray_head import (
    LOG_FILE,
    STATE_FILE,
    ensure_local_head,
    head_temp_dir,
    read_head_record,
    stop_local_head,
)
from workers.errors import RayClusterError
from workers.kafka.broker import free_port
from workers.runner import probe_ray_address

pytestmark = pytest.mark.slow


@pytest.fixture
def state_dirs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Hands out state dirs; every head started in one is stopped and its temp dir removed."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path / name)
        return made[-1]

    yield make
    for state_dir in made:
        stop_local_head(state_dir)
        shutil.rmtree(head_temp_dir(state_dir), ignore_errors=True)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited daemon nobody reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _answers(address: str) -> bool:
    try:
        probe_ray_address(address, timeout_s=2.0)
    except RayClusterError:
        return False
    return True


def test_a_head_is_started_reused_while_it_answers_and_stopped(state_dirs: Callable[[str], Path]) -> None:
    state_dir = state_dirs("state")
    address = ensure_local_head(state_dir, num_cpus=1)
    first = read_head_record(state_dir)
    assert first is not None and first.address == address and address.startswith("127.0.0.1:")
    assert _answers(address) and _running(first.pid)
    # The temp dir holds Ray's unix sockets: its paths must stay short.
    assert len(str(head_temp_dir(state_dir))) < 40

    assert ensure_local_head(state_dir) == address
    assert read_head_record(state_dir) == first  # the same head: same address, pid and start time

    stop_local_head(state_dir)
    assert not _running(first.pid) and not _answers(address)
    assert not (state_dir / STATE_FILE).exists()

    again = ensure_local_head(state_dir, num_cpus=1)
    second = read_head_record(state_dir)
    assert second is not None and second.address == again and _answers(again)
    assert second.pid != first.pid and second.started_at > first.started_at


def test_stopping_one_head_leaves_another_running(state_dirs: Callable[[str], Path]) -> None:
    one, other = state_dirs("one"), state_dirs("other")
    ensure_local_head(one, num_cpus=1)
    address = ensure_local_head(other, num_cpus=1)
    kept = read_head_record(other)
    assert kept is not None and head_temp_dir(one) != head_temp_dir(other)
    stop_local_head(one)
    assert _running(kept.pid) and _answers(address)
    assert ensure_local_head(other) == address


def test_an_unusable_state_file_is_replaced_and_the_stale_head_ended(state_dirs: Callable[[str], Path]) -> None:
    state_dir = state_dirs("state")
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text("{not json")
    address = ensure_local_head(state_dir, num_cpus=1)
    stale = read_head_record(state_dir)
    assert stale is not None and stale.address == address and _answers(address)

    # The record now names an address where nothing answers, while the old head's processes
    # still run in the same temp dir: they are ended before a new head starts there.
    dead = f"127.0.0.1:{free_port()}"
    (state_dir / STATE_FILE).write_text(json.dumps({**json.loads(stale.model_dump_json()), "address": dead}))
    fresh_address = ensure_local_head(state_dir, num_cpus=1)
    fresh = read_head_record(state_dir)
    assert fresh is not None and fresh.address == fresh_address != dead and _answers(fresh_address)
    assert fresh.pid != stale.pid and not _running(stale.pid) and not _answers(address)


def test_a_failed_start_names_the_cause_and_its_log_and_leaves_no_process(
        state_dirs: Callable[[str], Path]) -> None:
    state_dir = state_dirs("state")
    # Ray refuses a negative CPU count after its gcs_server started: that process must not stay.
    with pytest.raises(RayClusterError, match=r"(?s)ray start.*nonnegative.*" + LOG_FILE):
        ensure_local_head(state_dir, num_cpus=-1)
    assert read_head_record(state_dir) is None
    marker = str(head_temp_dir(state_dir))
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _running(int(pid))
            and marker in _cmdline(int(pid))]
    assert left == []
    address = ensure_local_head(state_dir, num_cpus=1)  # the next start is not spoiled by the failed one
    assert _answers(address)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
