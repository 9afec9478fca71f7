"""Run a JobSpec on Ray Train (a local Ray when none is reachable), with its reports streamed
back to the caller and a graceful stop (checkpoint first) on request."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .train.control import open_channel
from .spec import JobSpec
from .kafka.clients import SourceClientError, make_client
from .train.models import allowed_model_packages, build_model
from .train.loop import train_loop_per_worker

JobState = Literal["finished", "stopped", "failed"]


@dataclass(frozen=True)
class JobResult:
    """How a job ended: ``finished`` (bounded source drained or max_steps), ``stopped`` (on
    request, after a final checkpoint: run it again to resume) or ``failed`` (``error`` says why)."""

    state: JobState
    metrics: dict[str, Any]
    checkpoint_path: str | None
    error: str | None


def preflight(spec: JobSpec, model_packages: tuple[str, ...]) -> None:
    """Fail in seconds, naming the cause, on what would otherwise fail on every worker after Ray
    starts: an unknown or bad model, an unreachable broker, a missing topic.

    Raises ValueError (model) or SourceClientError (broker, topic).
    """
    build_model(spec.model.name, in_shape=spec.codec.input_shape, num_classes=spec.codec.num_classes,
                allowed_packages=model_packages, **spec.model.options)
    src = spec.source
    client = make_client(src.client, src.bootstrap_servers, spec.consumer_group, src.client_config,
                         timeout_s=src.metadata_timeout_s)
    try:
        topics = [src.topic] + ([spec.evaluation.topic] if spec.evaluation and spec.evaluation.topic else [])
        for topic in topics:
            client.partitions(topic, src.metadata_timeout_s)
    finally:
        client.close()


def run_job(spec: JobSpec, *, ray_address: str | None = None, num_cpus: int | None = None,
            on_report: Callable[[dict[str, Any]], None] | None = None,
            stop_requested: Callable[[], str | None] | None = None, poll_s: float = 0.25) -> JobResult:
    """Train until the source ends (stop_at: end), max_steps, a stop request, or failure.

    Blocks until then. ``on_report`` receives each report of the workers (rank 0's view of the
    global metrics) as it happens; ``stop_requested`` is asked every ``poll_s`` and, once it
    returns a reason, the workers finish their step, checkpoint and stop.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    model_packages = allowed_model_packages()
    try:
        preflight(spec, model_packages)
    except (ValueError, SourceClientError) as exc:
        return JobResult(state="failed", metrics={}, checkpoint_path=None, error=str(exc))
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    storage = spec.checkpoint.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
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
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # ray.train.TrainingFailedError: the workers' error, after retries
            outcome["error"] = exc

    # fit() blocks; the caller's thread stays free to relay reports and stop requests (and, in
    # the CLI, to receive signals, which Python delivers to the main thread only).
    runner = threading.Thread(target=fit, name=f"fit-{spec.job_id}", daemon=True)
    runner.start()
    stop_sent = False
    last: dict[str, Any] = {}  # the latest report, kept for a failure's summary

    def relay() -> None:
        for report in ray.get(channel.drain.remote()):
            metrics = report.model_dump(exclude_none=True)  # a workers.report.JobReport from the workers
            last.clear()
            last.update(metrics)
            if on_report is not None:
                on_report(metrics)

    try:
        while runner.is_alive():
            runner.join(poll_s)
            if not stop_sent and stop_requested is not None and (reason := stop_requested()) is not None:
                channel.request_stop.remote(reason)
                stop_sent = True
            relay()
        relay()
    finally:
        ray.kill(channel)
    if "error" in outcome:
        return JobResult(state="failed", metrics=dict(last), checkpoint_path=None, error=_reason(outcome["error"]))
    result = outcome["result"]
    metrics = dict(result.metrics or {})
    return JobResult(state="stopped" if metrics.get("stopped") else "finished", metrics=metrics,
                     checkpoint_path=_checkpoint_location(storage, result.checkpoint), error=None)


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

