"""Jobs through the real parts (embedded broker, local Ray with 2 CPUs): a stop request through
a job handle that checkpoints and a rerun on more workers that resumes exactly once, broker
outages mid-job (reported and survived, or failed past the deadline naming the checkpoint to
resume from), an unreachable broker at start, and the `train` command with a clean evaluation set,
an allow-listed model factory with BatchNorm and a rank whose partition is empty."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import Producer

from workers.kafka.broker import EmbeddedBroker, free_port
from workers.kafka.topics import ensure_topic
from workers.report import JobReport, JobResult
from workers.runner import run_job, submit
from workers.spec import JobSpec
from workers.train.checkpoints import load_state

from .test_train_job import _dead_letters, _lineage, _trained_until

pytestmark = pytest.mark.slow



def _send(bootstrap: str, topic: str, n: int, *, partitions: list[int], start: int = 0, seed: int = 0,
          dim: int = 8) -> None:
    """n JSON records of 3 well separated classes, round-robin over ``partitions``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, dim)) + 3 * np.eye(3, dim)[y]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, json.dumps({"x": x[i].tolist(), "y": int(y[i]), "id": str(start + i)}).encode(),
                         partition=partitions[i % len(partitions)])
    assert producer.flush(10) == 0


def _spec(bootstrap: str, topic: str, tmp_path: Path, **overrides: Any) -> JobSpec:
    doc: dict[str, Any] = {
        "job_id": "ctl-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": bootstrap, "topic": topic, "batch_size": 16, "max_wait_s": 0.05,
                   "health_check_s": 0.3, "metadata_timeout_s": 1.0},
        "codec": {"format": {"kind": "json"}, "input_shape": [8], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "cicw": {"method": "cicw", "burn_in_steps": 2, "anneal_steps": 2},
        "checkpoint": {"every_steps": 1000, "keep": 2, "storage_path": str(tmp_path / "ckpt")},
        "report_every_steps": 2, "max_failures": 0, "record_log_dir": str(tmp_path / "records"),
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            doc[section] = {**doc[section], field: value}
        else:
            doc[section] = value
    return JobSpec.model_validate(doc)


def _refuse_nan(constant: str) -> None:
    raise AssertionError(f"{constant} in JSON output")


def _records(offsets: dict[int, int]) -> list[tuple[int, int]]:
    """(partition, offset) of every record before the given next offsets."""
    return [(p, o) for p, end in sorted(offsets.items()) for o in range(end)]


def _sent(batches: list[int], partitions: int) -> dict[int, int]:
    """The end offsets after :func:`_send` wrote batches of these sizes round-robin to a new topic."""
    ends = dict.fromkeys(range(partitions), 0)
    for n in batches:
        for i in range(n):
            ends[i % partitions] += 1
    return ends


class Reports:
    """Collects a job's reports; lets a test thread wait for one that satisfies a condition."""

    def __init__(self) -> None:
        self.items: list[JobReport] = []
        self._cond = threading.Condition()

    def __call__(self, report: JobReport) -> None:
        with self._cond:
            self.items.append(report)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[JobReport], bool], timeout_s: float = 120.0) -> JobReport:
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while True:
                for m in self.items:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                assert left > 0, f"no such report in {timeout_s} s; last: {self.items[-1:]}"
                self._cond.wait(left)


def _in_background(fn: Any) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # surfaced by join_checked
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _stop_when(stop: list[str], thread: threading.Thread) -> Any:
    """Stop once the test thread asks, or failed (so a failed wait never leaves the job running)."""
    return lambda: stop[0] if stop else ("test thread failed" if thread.errors else None)  # type: ignore[attr-defined]


def _join_checked(thread: threading.Thread) -> None:
    thread.join(timeout=30)
    if thread.errors:  # type: ignore[attr-defined]
        raise thread.errors[0]  # type: ignore[attr-defined]


def test_stop_through_a_handle_checkpoints_and_a_rerun_on_more_workers_resumes_exactly_once(
        kafka_broker: EmbeddedBroker, local_ray: None, tmp_path: Path) -> None:
    topic = f"stop-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 3)
    _send(kafka_broker.bootstrap, topic, 100, partitions=[0, 1, 2])
    spec = _spec(kafka_broker.bootstrap, topic, tmp_path)  # unbounded: only the stop ends it
    reports = Reports()

    def producer() -> None:
        # The rest trickles in while the job trains (about 200 records/s), so the stop lands
        # mid-stream: with records fetched and decoded ahead that its checkpoint must not count.
        reports.wait_for(lambda r: r.step >= 2)
        for start in range(100, 1200, 20):
            _send(kafka_broker.bootstrap, topic, 20, partitions=[0, 1, 2], seed=start, start=start)
            time.sleep(0.1)

    handle = submit(spec)  # returns at once: the job runs while this thread watches it
    feeding = _in_background(producer)
    assert handle.job_id == spec.job_id and handle.status() in ("pending", "running") and not handle.done()
    with pytest.raises(TimeoutError, match=spec.job_id):
        handle.wait(timeout=0.1)
    stopped_at = None
    while not handle.done():
        for report in handle.reports():
            reports(report)
        if stopped_at is None and reports.items and reports.items[-1].step >= 10:
            assert handle.status() == "running" and handle.latest_report() == reports.items[-1]
            handle.stop("test says stop")
            stopped_at = reports.items[-1].step
        time.sleep(0.05)
    first = handle.wait()
    for report in handle.reports():
        reports(report)
    _join_checked(feeding)
    assert first.state == handle.status() == "stopped" and first.error is None, first.error
    assert first.report is not None and first.report.stopped == "test says stop" and first.report.final
    assert reports.items[-1] == first.report.model_copy(update={"offsets": reports.items[-1].offsets})
    state = load_state(first.checkpoint)
    assert state.counters.step == first.checkpoint_step == first.report.step
    # The stop's checkpoint counts exactly the records the model trained: no more, no fewer.
    assert sorted(_lineage(tmp_path / "records")) == _records(state.offsets)
    assert 10 * 16 <= first.report.examples < 1200

    # The same job again, bounded and on 3 workers (one per partition; partition 2 moves from
    # rank 0 to rank 2): it resumes from the stop's checkpoint and drains the rest.
    wider = spec.model_copy(update={"source": spec.source.model_copy(update={"stop_at": "end"}),
                                    "scaling": spec.scaling.model_copy(update={"num_workers": 3,
                                                                               "cpus_per_worker": 0.5})})
    second = run_job(wider)
    assert second.state == "finished", second.error
    assert second.report is not None and second.report.examples == 1200
    assert (tmp_path / "records" / "rank2.jsonl").exists()
    lineage = _lineage(tmp_path / "records")
    assert len(lineage) == len(set(lineage))  # no record trained twice into the model
    # and none missing, over both runs: the lineage is every record sent
    assert sorted(lineage) == _records(_sent([100] + [20] * 55, 3))


@dataclass
class OutageRun:
    """A job on a broker of its own (the test freezes it), with a test thread doing the outage."""

    broker: EmbeddedBroker
    topic: str
    reports: Reports = field(default_factory=Reports)
    stop: list[str] = field(default_factory=list)
    dead_letters: list[tuple[str, int, int]] = field(default_factory=list)  # read after the job


def _run_with_outage(tmp_path: Path, partitions: int, records: int, outage: Callable[[OutageRun], None],
                     *, then: Callable[[OutageRun], None] | None = None, read_dead_letters: bool = False,
                     **overrides: Any) -> tuple[JobResult, OutageRun, float]:
    """Run a job over ``records`` records on ``partitions`` partitions (and whatever ``then`` adds
    before the job starts) while ``outage`` runs in a test thread; the broker is resumed at the
    end whatever happened. Returns the result, the run (its reports, and its dead letters when
    asked for) and the job's wall time."""
    with EmbeddedBroker() as broker:
        run = OutageRun(broker, f"outage-{uuid.uuid4().hex[:8]}")
        ensure_topic(broker.bootstrap, run.topic, partitions)
        _send(broker.bootstrap, run.topic, records, partitions=list(range(partitions)))
        if then is not None:
            then(run)
        spec = _spec(broker.bootstrap, run.topic, tmp_path, **overrides)
        thread = _in_background(lambda: outage(run))
        started = time.monotonic()
        try:
            result = run_job(spec, on_report=run.reports, stop_requested=_stop_when(run.stop, thread))
        finally:
            broker.resume()
        seconds = time.monotonic() - started
        _join_checked(thread)
        if read_dead_letters:
            run.dead_letters = _dead_letters(broker.bootstrap, run.topic)
    return result, run, seconds


def test_broker_outage_mid_job_is_reported_and_training_continues(local_ray: None, tmp_path: Path) -> None:
    def outage(run: OutageRun) -> None:
        run.reports.wait_for(lambda r: r.examples == 400)
        run.broker.pause()
        try:
            run.reports.wait_for(lambda r: r.stalled_s > 1)
        finally:
            run.broker.resume()
        _send(run.broker.bootstrap, run.topic, 400, partitions=[0], seed=1, start=400)
        run.reports.wait_for(lambda r: r.examples == 800)
        run.stop.append("done")

    # One partition, fewer than the workers: rank 1 reads none.
    result, run, _ = _run_with_outage(tmp_path, 1, 400, outage, source__stall_deadline_s=120.0)
    assert result.state == "stopped", result.error
    stalls = [r for r in run.reports.items if r.stalled_s > 0]
    assert stalls and "watermarks" in (stalls[0].stall_reason or "")
    assert load_state(result.checkpoint).offsets == {0: 800}
    assert sorted(_lineage(tmp_path / "records")) == _records({0: 800})


def test_stop_during_a_broker_outage_checkpoints_and_stops(local_ray: None, tmp_path: Path) -> None:
    def outage(run: OutageRun) -> None:
        run.reports.wait_for(lambda r: r.examples == 300)
        run.broker.pause()
        run.reports.wait_for(lambda r: r.stalled_s > 1)
        run.stop.append("stop while the broker is away")

    result, _, seconds = _run_with_outage(tmp_path, 2, 300, outage, source__stall_deadline_s=300.0)
    # The checkpoint does not need the broker; only the consumer-group commit (for lag tools)
    # does, and it is given up after a few seconds with a warning: the checkpoint is the truth.
    assert result.state == "stopped", result.error
    assert load_state(result.checkpoint).offsets == {0: 150, 1: 150}
    assert sorted(_lineage(tmp_path / "records")) == _records({0: 150, 1: 150})
    assert seconds < 120


def test_broker_outage_past_the_deadline_fails_the_job_with_the_reason(local_ray: None, tmp_path: Path) -> None:
    def outage(run: OutageRun) -> None:
        run.reports.wait_for(lambda r: r.examples == 100)
        run.broker.pause()

    result, _, seconds = _run_with_outage(tmp_path, 2, 100, outage, source__stall_deadline_s=3.0,
                                          checkpoint__every_steps=2)
    assert result.state == "failed"
    assert "past source.stall_deadline_s=3.0" in (result.error or ""), result.error
    assert result.report is not None and result.report.examples == 100  # the last report before the failure
    # The failure names the checkpoint a rerun resumes from, and the step it holds.
    assert result.checkpoint is not None and result.checkpoint_step is not None, result
    state = load_state(result.checkpoint)
    assert 0 < state.counters.step == result.checkpoint_step <= result.report.step
    assert _trained_until(tmp_path / "records", result.checkpoint_step) == set(_records(state.offsets))
    assert seconds < 120


def test_dead_letters_pending_in_an_outage_postpone_the_checkpoint(local_ray: None, tmp_path: Path) -> None:
    # A checkpoint may only count a rejected record as consumed once its dead letter is
    # delivered. The broker freezes after every record was fetched and before the garbage is
    # decoded: the garbage's dead letters cannot leave, so the checkpoints due at every step are
    # postponed (not failed) until the broker is back, and the job ends with everything in place.
    def garbage_then_more(run: OutageRun) -> None:
        producer = Producer({"bootstrap.servers": run.broker.bootstrap})
        for _ in range(3):
            producer.produce(run.topic, value=b"not json", partition=0)
        assert producer.flush(10) == 0
        _send(run.broker.bootstrap, run.topic, 600, partitions=[0, 1], seed=1, start=600)

    def outage(run: OutageRun) -> None:
        # Checkpoints at every step (each waits for Ray Train's 0.25 s poll) pace the job: step
        # 4 comes seconds after the poller fetched everything, and rank 0 meets the garbage
        # at its step 19.
        run.reports.wait_for(lambda r: r.step >= 4)
        run.broker.pause()
        try:
            run.reports.wait_for(lambda r: r.checkpoint_postponed is not None)
        finally:
            run.broker.resume()

    result, run, _ = _run_with_outage(tmp_path, 2, 600, outage, then=garbage_then_more, read_dead_letters=True,
                                      source__stop_at="end", checkpoint__every_steps=1)
    assert result.state == "finished", result.error
    postponed = [r for r in run.reports.items if r.checkpoint_postponed is not None]
    assert postponed and "not delivered" in (postponed[0].checkpoint_postponed or "")
    assert min(r.step for r in postponed) >= 4
    assert result.report is not None and result.report.examples == 1200 and result.report.rejected == 3
    assert load_state(result.checkpoint).offsets == {0: 603, 1: 600}
    lineage = _lineage(tmp_path / "records")
    assert len(lineage) == len(set(lineage))
    # Partition 0: 300 good records, the 3 garbage ones (offsets 300-302), 300 more.
    assert sorted(lineage) == [(0, o) for o in [*range(300), *range(303, 603)]] + [(1, o) for o in range(600)]
    # Dead letters are delivered at least once (a retry after the outage may repeat one): each
    # carries its source's identity, which a reader dedupes on.
    assert set(run.dead_letters) == {(run.topic, 0, o) for o in (300, 301, 302)}


def test_train_command_fails_fast_when_the_broker_is_unreachable(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from service.cli import main as cli_main

    spec = tmp_path / "job.yaml"
    spec.write_text(f"job_id: nobroker\nsource: {{bootstrap_servers: '127.0.0.1:{free_port()}', topic: t, "
                    "metadata_timeout_s: 2, client_config: {socket.connection.setup.timeout.ms: '1000'}}\n"
                    "codec: {input_shape: [4], num_classes: 3}\n")
    started = time.monotonic()
    assert cli_main(["train", str(spec), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out, parse_constant=_refuse_nan)
    assert summary["state"] == "failed" and "cannot read metadata of topic 't'" in summary["error"]
    assert summary["checkpoint"] is None and summary["report"] is None
    assert time.monotonic() - started < 30


def test_train_command_with_eval_set_factory_model_and_an_empty_rank(
        kafka_broker: EmbeddedBroker, local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys) -> None:  # type: ignore[no-untyped-def]
    from service.cli import main as cli_main

    bootstrap = kafka_broker.bootstrap
    topic, eval_topic = f"cmd-{uuid.uuid4().hex[:8]}", f"cmd-eval-{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic, 3)
    # Partition 1 stays empty: with 2 workers, rank 1 owns only it and never has a local batch,
    # while the model has BatchNorm layers (small_cnn), so every step has an empty rank.
    _send(bootstrap, topic, 960, partitions=[0, 2], dim=16)
    ensure_topic(bootstrap, eval_topic, 2)
    _send(bootstrap, eval_topic, 300, partitions=[0, 1], seed=7, dim=16)
    monkeypatch.setenv("CICW_MODEL_PACKAGES", "workers")
    spec = _spec(bootstrap, topic, tmp_path, source__stop_at="end",
                 codec={"format": {"kind": "json"}, "input_shape": [1, 4, 4], "num_classes": 3},
                 model={"name": "workers.train.models:small_cnn", "options": {"width": 8}},
                 evaluation={"topic": eval_topic, "every_steps": 10})
    (tmp_path / "job.json").write_text(spec.model_dump_json())
    assert cli_main(["train", str(tmp_path / "job.json"), "--json"]) == 0
    captured = capsys.readouterr()
    # No record has a clean_label header: noise precision is undefined, null in JSON (never NaN).
    summary = json.loads(captured.out, parse_constant=_refuse_nan)
    report = summary["report"]
    assert summary["state"] == "finished" and report["examples"] == 960 and report["noise_precision"] is None
    assert report["eval_examples"] == 300 and report["eval_accuracy"] > 0.6  # 3 separable classes
    assert summary["checkpoint_step"] == report["step"] and summary["checkpoint"].startswith(str(tmp_path))
    progress = captured.err.splitlines()
    assert any("rec/s" in line and "lag" in line and "eval" in line for line in progress), progress
    ranks = {f.name: [json.loads(x) for x in f.read_text().splitlines()]
             for f in (tmp_path / "records").glob("*.jsonl")}
    assert all(not line["records"] for line in ranks["rank1.jsonl"])  # stepped along with no records
    assert len(ranks["rank1.jsonl"]) == len(ranks["rank0.jsonl"]) > 0
    assert sorted(_lineage(tmp_path / "records")) == _records({0: 480, 2: 480})


def test_sigint_to_the_train_command_checkpoints_and_exits_cleanly(kafka_broker: EmbeddedBroker,
                                                                    tmp_path: Path) -> None:
    import io
    import os
    import signal
    import subprocess
    import sys

    from PIL import Image

    topic = f"sig-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    # PNG records through the image codec with the pad-crop-flip augmentation.
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    rng = np.random.default_rng(3)
    for i in range(200):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        producer.produce(topic, buf.getvalue(), partition=i % 2, headers=[("label", str(i % 3).encode())])
    assert producer.flush(10) == 0
    spec = _spec(kafka_broker.bootstrap, topic, tmp_path,  # unbounded: it would run forever
                 codec={"format": {"kind": "image", "augment": True}, "input_shape": [3, 8, 8], "num_classes": 3},
                 model={"name": "small_cnn", "options": {"width": 4}})
    (tmp_path / "job.json").write_text(spec.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "train", str(tmp_path / "job.json"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first progress line: the job is training
            if "records" in line and "step" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    summary = json.loads(out.strip().splitlines()[-1], parse_constant=_refuse_nan)
    assert summary["state"] == "stopped" and summary["report"]["stopped"] == "SIGINT received"
    offsets = load_state(summary["checkpoint"]).offsets
    assert 0 < summary["report"]["examples"] <= 200
    assert sorted(_lineage(tmp_path / "records")) == _records(offsets)  # what it trained, no more, no less


def test_a_stopped_and_resumed_job_trains_the_same_model_as_one_that_ran_through(
        kafka_broker: EmbeddedBroker, local_ray: None, tmp_path: Path) -> None:
    topic = f"same-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    _send(kafka_broker.bootstrap, topic, 15 * 32, partitions=[0])
    # One rank, one partition and full batches (max_wait_s long enough to fill them): the same
    # batches in every run, so only the random draws (initial weights, mixup) could differ.
    through = _spec(kafka_broker.bootstrap, topic, tmp_path, scaling={"num_workers": 1},
                    source__stop_at="end", source__batch_size=32, source__max_wait_s=5.0,
                    cicw={"method": "cicw_m", "burn_in_steps": 2, "anneal_steps": 2}, seed=7)
    interrupted = through.model_copy(update={"job_id": through.job_id + "-i", "max_steps": 6})

    whole = run_job(through)
    first = run_job(interrupted)
    assert first.state == "finished" and load_state(first.checkpoint).counters.step == first.checkpoint_step == 6
    rest = run_job(interrupted.model_copy(update={"max_steps": None}))
    assert whole.state == rest.state == "finished", (whole.error, rest.error)

    a, b = load_state(whole.checkpoint), load_state(rest.checkpoint)
    assert a.counters.step == b.counters.step == 15 and a.offsets == b.offsets == {0: 480}
    assert len(b.rng) == 1 and torch.equal(a.rng[0]["mixup"], b.rng[0]["mixup"])
    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model), "resumed model differs"


def test_a_bug_surfaces_as_an_exception_not_as_a_failed_job(local_ray: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.runner import JobHandle
    from workers.train.control import open_channel

    # A model factory with a genuine bug: preflight lets it through (it is no CicwStreamError).
    (tmp_path / "buggy_models.py").write_text("def net(in_shape, num_classes):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec("127.0.0.1:1", "t", tmp_path, model={"name": "buggy_models:net"})
    with pytest.raises(ZeroDivisionError):
        run_job(spec, model_packages=("buggy_models",))

    # fit() itself raising something other than Ray Train's TrainingFailedError (a bug on the
    # driver's side): wait() raises it, rather than calling the job failed.
    class BrokenTrainer:
        def fit(self) -> None:
            raise KeyError("bug")

    handle = JobHandle("broken", str(tmp_path / "ckpt"), BrokenTrainer(), open_channel())
    for _ in range(2):  # and again on a second call
        with pytest.raises(KeyError, match="bug"):
            handle.wait(timeout=30)
    assert handle.done() and handle.reports() == []


def test_a_dead_letter_topic_kafka_would_refuse_fails_the_job_before_it_starts(kafka_broker: EmbeddedBroker,
                                                                              local_ray: None, tmp_path: Path) -> None:
    # Kafka topic names end at 249 characters, so this topic's dead-letter topic (+ ".dlq") is one
    # a broker refuses for good. The embedded broker would create it anyway; the preflight checks
    # the name first, so the submission fails naming it, before any record is consumed. (A
    # refusal that only shows mid-stream, an ACL, fails every rank through the shared decision:
    # tests/workers/test_dead_letters.py.)
    topic = f"refused-{uuid.uuid4().hex[:8]}-".ljust(249, "x")
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    _send(kafka_broker.bootstrap, topic, 100, partitions=[0, 1])

    result = run_job(_spec(kafka_broker.bootstrap, topic, tmp_path, source__stop_at="end"))
    assert result.state == "failed" and f"{topic}.dlq" in (result.error or ""), result.error
    assert "not a valid Kafka topic name" in (result.error or "") and "253" in (result.error or "")
    assert result.rank_errors == {} and result.checkpoint is None  # no worker ran
