"""Run JobSpecs on Ray Train without blocking the caller: :func:`submit` starts a job and returns
a :class:`JobHandle` (status, reports, stop, result); :func:`run_job` is the blocking wrapper the
CLI uses.

Global setup stays with the entry point: :func:`connect_ray` starts or joins Ray once per process,
and the caller reads the environment (``CICW_MODEL_PACKAGES``) and passes what it found. Nothing
here keeps module-level state, so a long-running service (or a detached Ray actor) can hold many
handles at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CicwStreamError, RayClusterError
from .kafka.clients import make_client
from .kafka.dead_letters import DLQ_SUFFIX
from .kafka.topics import ensure_topic
from .report import JobReport, JobResult, JobStatus
from .spec import JobSpec
from .storage import redact_uri
from .train.checkpoint_meta import read_meta
from .train.control import MAX_PENDING_REPORTS, open_channel
from .train.loop import train_loop_per_worker
from .train.models import build_model

log = logging.getLogger(__name__)
# How long a named Ray cluster gets to accept a TCP connection before it counts as unreachable.
RAY_PROBE_TIMEOUT_S = 5.0


def connect_ray(address: str | None, *, num_cpus: int | None = None,
                probe_timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Initialise Ray for this process, unless it already is (a test, or a service that owns it).

    Without ``address`` a fresh local Ray is started: never whichever cluster this machine last
    ran (Ray's default reads that from its current-cluster file, and a dead cluster there made
    ``ray.init()`` retry for minutes). With ``address`` (``host:port`` of its GCS, or
    ``ray://host:port`` for Ray Client), the cluster must accept a connection within
    ``probe_timeout_s``; raises RayClusterError naming the address otherwise.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return
    probe_ray_address(address, timeout_s=probe_timeout_s)
    ray.init(address=address)


def probe_ray_address(address: str, *, timeout_s: float) -> None:
    """Raise RayClusterError, naming ``address``, unless something accepts a TCP connection there."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(f"Ray address {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayClusterError(f"Ray cluster at {address!r} is unreachable: {exc}") from exc


def preflight(spec: JobSpec, model_packages: tuple[str, ...]) -> None:
    """Fail in seconds, naming the cause, on what would otherwise fail on every worker after Ray
    starts: an unknown or bad model, an unreachable broker, a missing topic, a checkpoint to
    resume from that was written for other data (another topic or codec). Creates the topics the
    job writes to (:func:`output_topics`, one partition) where they do not exist yet.

    Raises ModelError (model), SourceClientError (broker, topic) or CheckpointError.
    """
    build_model(spec.model.name, in_shape=spec.codec.input_shape, num_classes=spec.codec.num_classes,
                allowed_packages=model_packages, **spec.model.options)
    src = spec.source
    client = make_client(src.client, src.bootstrap_servers, spec.consumer_group, src.client_config,
                         timeout_s=src.metadata_timeout_s)
    try:
        for topic in input_topics(spec):
            client.partitions(topic, src.metadata_timeout_s)
    finally:
        client.close()
    for topic in output_topics(spec):
        # Where the cluster does not create topics on first write, a record routed to a missing
        # topic would stop the job mid-stream; created here (or refused, naming it) it cannot.
        ensure_topic(src.bootstrap_servers, topic, 1, src.client_config, timeout_s=src.metadata_timeout_s)
    # The workers check it too, but only after Ray started them (and retried max_failures times).
    if (durable := latest_checkpoint(storage_location(spec), spec.job_id)) is not None:
        read_meta(durable.location).check_resumable(spec)


def input_topics(spec: JobSpec) -> list[str]:
    """The topics a job reads: its source and, when it has one, its evaluation topic."""
    return [spec.source.topic] + ([spec.evaluation.topic] if spec.evaluation and spec.evaluation.topic else [])


def output_topics(spec: JobSpec) -> list[str]:
    """The topics a job writes to: the dead-letter topic of each topic it reads, and the
    suspects topic when it publishes suspects."""
    topics = [topic + DLQ_SUFFIX for topic in input_topics(spec)]
    if spec.suspects is not None:
        topics.append(spec.suspects.topic_for(spec.source.topic))
    return topics


def storage_location(spec: JobSpec) -> str:
    """The spec's checkpoint storage as Ray Train is given it: a URI as is, a local path absolute."""
    storage = spec.checkpoint.storage_path
    return storage if "://" in storage else str(Path(storage).resolve())


@dataclass(frozen=True)
class DurableCheckpoint:
    """A checkpoint Ray Train registered: where it lies and the job step it was written at."""

    location: str
    step: int


def latest_checkpoint(storage_path: str, job_id: str) -> DurableCheckpoint | None:
    """The checkpoint a rerun of ``job_id`` resumes from, or None when there is none yet.

    Ray Train resumes from the latest checkpoint its run folder (``{storage_path}/{job_id}``, a
    local path or a pyarrow URI) has registered, not from the newest folder there: one uploaded
    by a worker killed before its registration is ignored. So this reads the same registry.
    """
    from ray.train import Result

    base, _, query = storage_path.partition("?")
    run = f"{base.rstrip('/')}/{job_id}" + (f"?{query}" if query else "")
    try:
        restored = Result.from_path(run)
    except RuntimeError:  # no run folder, or no checkpoint registered in it
        return None
    except OSError as exc:  # the storage cannot be read (pyarrow's errors): the summary says so, no crash
        log.warning("cannot read the checkpoints of job %s in %s: %s", job_id, redact_uri(storage_path), exc)
        return None
    location = _checkpoint_location(storage_path, restored.checkpoint)
    if location is None:
        return None
    return DurableCheckpoint(location, int((restored.metrics or {}).get("step", 0)))


def failed_result(spec: JobSpec, error: str) -> JobResult:
    """A failed job's result when no worker ran (preflight, Ray): the error and the checkpoint
    that a rerun, once the cause is fixed, resumes from."""
    durable = latest_checkpoint(storage_location(spec), spec.job_id)
    return JobResult(job_id=spec.job_id, state="failed", error=error,
                     checkpoint=durable.location if durable else None,
                     checkpoint_step=durable.step if durable else None)


@dataclass
class _Fit:
    """What ``trainer.fit()`` gave: its Result, or the exception it raised."""

    result: Any = None
    error: BaseException | None = None  # ray.train.TrainingFailedError: the job failed
    crash: BaseException | None = None  # anything else: a bug on this side, raised by JobHandle.wait()


class JobHandle:
    """A submitted job: ask how it goes, read its reports, stop it, wait for its result.

    Methods may be called from any thread; none blocks on the job except :meth:`wait`.
    """

    def __init__(self, job_id: str, storage: str, trainer: Any, channel: Any) -> None:
        self.job_id = job_id
        self._storage = storage
        self._channel = channel
        self._lock = threading.RLock()
        # Bounded like the channel: a caller reading only latest_report() must not grow it forever.
        self._unread: deque[JobReport] = deque(maxlen=MAX_PENDING_REPORTS)
        self._latest: JobReport | None = None
        self._result: JobResult | None = None
        self._closed = False  # the channel was drained a last time and killed
        self._fit = _Fit()
        # fit() blocks for the job's life; it runs on a thread of its own so the caller's stays free.
        self._thread = threading.Thread(target=self._run, args=(trainer,), name=f"fit-{job_id}", daemon=True)
        self._thread.start()

    def _run(self, trainer: Any) -> None:
        from ray.train import TrainingFailedError

        try:
            self._fit.result = trainer.fit()
        except TrainingFailedError as exc:  # the workers' error, after Ray Train's retries
            self._fit.error = exc
        except BaseException as exc:
            self._fit.crash = exc

    def done(self) -> bool:
        """True once the job ended (its result is ready)."""
        return not self._thread.is_alive()

    def status(self) -> JobStatus:
        """``pending`` until the workers report, ``running``, then how the job ended."""
        if self.done():
            return self.wait().state
        return "running" if self.latest_report() is not None else "pending"

    def reports(self) -> list[JobReport]:
        """The reports received since the last call, oldest first (never waits for one)."""
        with self._lock:
            self._pull()
            out = list(self._unread)
            self._unread.clear()
            return out

    def latest_report(self) -> JobReport | None:
        """The newest report so far, read or not."""
        with self._lock:
            self._pull()
            return self._latest

    def stop(self, reason: str) -> None:
        """Ask the workers to finish their step, checkpoint and stop (the first reason is kept)."""
        with self._lock:
            if not self._closed:
                self._channel.request_stop.remote(reason)

    def wait(self, timeout: float | None = None) -> JobResult:
        """The job's result once it ended; TimeoutError if it still runs after ``timeout`` s."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"job {self.job_id!r} still running after {timeout} s")
        with self._lock:
            if not self._closed:
                import ray

                self._pull()  # the last reports, before the channel goes
                ray.kill(self._channel)
                self._closed = True
            if self._fit.crash is not None:
                raise self._fit.crash
            if self._result is None:
                self._result = _result_of(self.job_id, self._storage, self._fit, self._latest)
            return self._result

    def _pull(self) -> None:
        """Move the channel's reports into this handle (the lock is held)."""
        if self._closed:
            return  # the channel is gone; everything it had was pulled
        import ray

        drained: list[JobReport] = ray.get(self._channel.drain.remote())
        self._unread.extend(drained)
        if drained:
            self._latest = drained[-1]


def _result_of(job_id: str, storage: str, fit: _Fit, latest: JobReport | None) -> JobResult:
    """How the job ended, from fit()'s outcome and the last report received."""
    if fit.error is not None:
        durable = latest_checkpoint(storage, job_id)
        from ray.train import WorkerGroupError

        # Ray Train keeps each failed rank's exception (a controller failure has none).
        per_rank = fit.error.worker_failures if isinstance(fit.error, WorkerGroupError) else {}
        return JobResult(job_id=job_id, state="failed", report=latest, error=_reason(fit.error),
                         rank_errors={int(r): f"{type(exc).__name__}: {_reason(exc)}" for r, exc in per_rank.items()},
                         checkpoint=durable.location if durable else None,
                         checkpoint_step=durable.step if durable else None)
    result = fit.result
    # The final report reached Ray Train with the last checkpoint; the channel's copy may not
    # have been read yet.
    final = JobReport.model_validate(result.metrics) if result.metrics else latest
    checkpoint = _checkpoint_location(storage, result.checkpoint)
    step = final.step if final is not None and checkpoint is not None else None
    if final is not None and step is not None:
        final = final.model_copy(update={"checkpoint_step": step})
    return JobResult(job_id=job_id, state="stopped" if final is not None and final.stopped else "finished",
                     report=final, checkpoint=checkpoint, checkpoint_step=step)


def submit(spec: JobSpec, *, model_packages: tuple[str, ...] = ()) -> JobHandle:
    """Start ``spec`` on Ray Train and return at once.

    Ray must be initialised (see :func:`connect_ray`). Runs :func:`preflight` first, so a bad
    model, an unreachable broker or a missing topic raises its CicwStreamError leaf here, in
    seconds. ``model_packages``: the packages whose model factories the spec may name.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call workers.runner.connect_ray() first")
    preflight(spec, model_packages)
    storage = storage_location(spec)
    channel = open_channel()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "channel": channel,
                           "model_packages": model_packages},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=RunConfig(name=spec.job_id, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    return JobHandle(spec.job_id, storage, trainer, channel)


def run_job(spec: JobSpec, *, model_packages: tuple[str, ...] = (),
            on_report: Callable[[JobReport], None] | None = None,
            stop_requested: Callable[[], str | None] | None = None, poll_s: float = 0.25) -> JobResult:
    """Train until the source ends (stop_at: end), max_steps, a stop request, or failure; blocks
    until then (Ray must be initialised, see :func:`connect_ray`).

    ``on_report`` receives each report of the workers as it arrives; ``stop_requested`` is asked
    every ``poll_s`` and, once it returns a reason, the workers finish their step, checkpoint and
    stop. A preflight failure comes back as a failed result, like a failure on the workers.
    """
    try:
        handle = submit(spec, model_packages=model_packages)
    except CicwStreamError as exc:
        return failed_result(spec, str(exc))
    deliver = on_report or (lambda _report: None)
    stop_sent = False
    while not handle.done():
        if not stop_sent and stop_requested is not None and (reason := stop_requested()) is not None:
            handle.stop(reason)
            stop_sent = True
        for report in handle.reports():
            deliver(report)
        time.sleep(poll_s)
    result = handle.wait()
    for report in handle.reports():  # those the channel still held at the end
        deliver(report)
    return result


def _checkpoint_location(storage: str, checkpoint: Any) -> str | None:
    """Where the checkpoint lies, as the storage was given: a local path, or a URI such as
    s3://bucket/... (Ray Train hands out the path on its filesystem, without the scheme, and
    the storage URI's query, e.g. an endpoint override, is not repeated)."""
    if checkpoint is None:
        return None
    if "://" not in storage:
        return str(checkpoint.path)
    return f"{storage.split('://', 1)[0]}://{checkpoint.path}"


def _reason(exc: BaseException) -> str:
    """The innermost message of a Ray Train failure: the worker's own exception, not the wrapper."""
    text = str(exc)
    # WorkerGroupError lists each rank's traceback; its last line is the exception itself.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else repr(exc)
