"""Run a JobSpec on Ray Train (a local Ray when none is reachable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .job_spec import JobSpec
from .train_loop import train_loop_per_worker


@dataclass(frozen=True)
class JobResult:
    metrics: dict[str, Any]
    checkpoint_path: str | None
    error: str | None


def run_job(spec: JobSpec, *, ray_address: str | None = None, num_cpus: int | None = None) -> JobResult:
    """Train until the source ends (stop_at: end), max_steps, or failure; block until then."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    storage = spec.checkpoint.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=RunConfig(name=spec.job_id, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    result = trainer.fit()
    return JobResult(metrics=dict(result.metrics or {}),
                     checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                     error=repr(result.error) if result.error else None)
