"""The `train` command's summary and its Ray connection, without a job (fakes where no job runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from service.cli import _summarise, summary_lines
from workers.errors import RayClusterError
from workers.kafka.broker import EmbeddedBroker, free_port
from workers.kafka.topics import ensure_topic
from workers.report import JobReport, JobResult
from workers.runner import connect_ray


def _refuse_nan(constant: str) -> None:
    raise AssertionError(f"{constant} in JSON output")


FAILED = JobResult(job_id="j", state="failed", error="broker unreachable for 400 s",
                   checkpoint="/ckpt/j/checkpoint_000003", checkpoint_step=210,
                   report=JobReport(step=214, examples=6848, loss=float("nan"), noise_precision=float("inf"),
                                    offsets={0: 3424, 1: 3424}))


def test_json_summary_is_valid_json_naming_the_checkpoint_of_a_failed_job(capsys) -> None:  # type: ignore[no-untyped-def]
    assert _summarise(FAILED, as_json=True) == 1
    summary = json.loads(capsys.readouterr().out, parse_constant=_refuse_nan)
    assert summary["state"] == "failed" and summary["error"] == "broker unreachable for 400 s"
    assert summary["checkpoint"] == "/ckpt/j/checkpoint_000003" and summary["checkpoint_step"] == 210
    assert summary["report"]["loss"] is None and summary["report"]["noise_precision"] is None
    assert JobResult.model_validate(summary) == FAILED  # the summary is the typed result, read back


def test_text_summary_reads_the_typed_fields() -> None:
    lines = summary_lines(FAILED)
    assert lines[:5] == ["job_id: j", "state: failed", "checkpoint: /ckpt/j/checkpoint_000003",
                         "checkpoint_step: 210", "error: broker unreachable for 400 s"]
    assert "step: 214" in lines and "examples: 6848" in lines
    assert not any(line.startswith(("loss:", "offsets:")) for line in lines)  # undefined, or too long
    finished = JobResult(job_id="j", state="finished", report=JobReport(step=1, examples=2))
    assert _summarise(finished, as_json=False) == 0


def test_connect_ray_to_an_address_where_nothing_listens_names_it() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(RayClusterError, match=f"Ray cluster at '{address}' is unreachable"):
        connect_ray(address)
    with pytest.raises(RayClusterError, match="'auto' is not host:port"):
        connect_ray("auto")


def test_connect_ray_without_an_address_starts_a_fresh_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    connect_ray(None, num_cpus=3)
    # "local", not None: None would attach to whichever cluster this machine started last.
    assert calls == [{"address": "local", "num_cpus": 3, "include_dashboard": False, "log_to_driver": False}]


@pytest.mark.slow
def test_train_command_fails_fast_naming_an_unreachable_ray_address(kafka_broker: EmbeddedBroker,
                                                                     tmp_path: Path) -> None:
    topic = f"noray-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 1)  # the preflight passes: only Ray is missing
    spec = tmp_path / "job.yaml"
    spec.write_text(f"job_id: noray\nsource: {{bootstrap_servers: '{kafka_broker.bootstrap}', topic: {topic}}}\n"
                    f"codec: {{input_shape: [4], num_classes: 3}}\ncheckpoint: {{storage_path: '{tmp_path}'}}\n")
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "service.cli", "train", str(spec), "--json",
                           "--ray-address", address], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})
    seconds = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout, parse_constant=_refuse_nan)
    assert summary["state"] == "failed" and f"Ray cluster at '{address}' is unreachable" in summary["error"]
    assert summary["checkpoint"] is None
    # A cluster that is not there fails the command in seconds (it once retried for ten
    # minutes); the process's own imports take most of this.
    assert seconds < 30, seconds
