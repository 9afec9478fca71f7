"""The REST contract of /v1/jobs: what the API accepts and returns, one model per body.

Imports pydantic and workers' torch-free models only, so the CLI (a REST client) shares these
definitions with the server without pulling in torch, Ray or SQLAlchemy.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from workers.report import JobReport


class JobState(StrEnum):
    """Where a job is. PENDING: submitted, its workers have not reported yet. STOPPING: a stop
    was asked, the workers are finishing their step and checkpointing. STOPPED: stopped after a
    final checkpoint (resume continues it exactly once). SUCCEEDED: a bounded source drained or
    max_steps reached. FAILED: ``reason`` says why."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    SUCCEEDED = "SUCCEEDED"

    @property
    def active(self) -> bool:
        """True while a driver runs the job on Ray."""
        return self in (JobState.PENDING, JobState.RUNNING, JobState.STOPPING)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CheckpointRef(_Out):
    """A durable checkpoint of a job."""

    id: str = Field(description="The checkpoint's name within the job (e.g. checkpoint_2026-12-03_16-20-01.123456).")
    step: NonNegativeInt = Field(description="Optimizer steps taken when it was written.")
    examples: NonNegativeInt = Field(description="Records trained into the model when it was written.")
    written_at: datetime = Field(description="When it was written (UTC).")


class CheckpointDetail(CheckpointRef):
    """One checkpoint: where each partition resumes, the metrics reported with it, its size."""

    offsets: dict[int, NonNegativeInt] = Field(description="Partition -> next offset a resume reads.")
    metrics: JobReport | None = Field(None, description="The report written with this checkpoint, if known.")
    size_bytes: NonNegativeInt = Field(description="Bytes of all its files.")


class CheckpointList(_Out):
    """A job's durable checkpoints, newest first."""

    items: list[CheckpointRef]


class LastCheckpoint(_Out):
    """The job's latest durable checkpoint, as its reports announced it."""

    step: NonNegativeInt
    written_at: datetime | None = None


class JobProgress(_Out):
    """How far a job got, from its latest report."""

    step: NonNegativeInt = 0
    records: NonNegativeInt = Field(0, description="Records trained into the model.")
    rejected: NonNegativeInt = Field(0, description="Records sent to the dead-letter topic.")
    lag: NonNegativeInt | None = Field(None, description="Records on the job's partitions not yet read.")
    lag_per_partition: dict[int, NonNegativeInt] = Field(default_factory=dict)
    records_per_s: float | None = None
    last_report: JobReport | None = None
    last_report_at: datetime | None = None
    last_checkpoint: LastCheckpoint | None = None


class JobOut(_Out):
    """A job as the API shows it. Secrets in its spec (passwords, keys) are masked."""

    id: str
    state: JobState
    reason: str | None = Field(None, description="Why the job failed or stopped.")
    spec: dict[str, Any] = Field(description="The job spec as submitted, secrets masked.")
    spec_hash: str = Field(description="sha256 of the spec (secrets included, never shown).")
    runs: NonNegativeInt = Field(description="How often the job was started (1 + resumes).")
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    progress: JobProgress


T = TypeVar("T")


class Page(_Out, Generic[T]):
    """One page of a listing; ``next_cursor`` fetches the next (None: last page)."""

    items: list[T]
    next_cursor: str | None = None


class JobList(Page[JobOut]):
    """Jobs, newest first."""


class MetricPoint(_Out):
    """One report of the time series."""

    at: datetime
    run: NonNegativeInt
    report: JobReport


class MetricSeries(_Out):
    """A job's reports over time, at most ``max_points`` (evenly downsampled, newest kept)."""

    job_id: str
    points: list[MetricPoint]
    total_reports: NonNegativeInt = Field(description="Reports stored before downsampling.")


class ModelCard(_Out):
    """What the latest model is and how good it is."""

    job_id: str
    architecture: str = Field(description="The model's registered name (e.g. mlp).")
    model_options: dict[str, Any] = Field(default_factory=dict)
    num_classes: int
    input_shape: list[int]
    record_format: dict[str, Any] = Field(description="The codec's record format: what predict accepts.")
    checkpoint: str = Field(description="The checkpoint the weights come from.")
    step: NonNegativeInt
    records_trained: NonNegativeInt
    clean_accuracy: float | None = Field(None, description="Accuracy on the clean evaluation set, if one is set.")
    prequential_accuracy: float | None = None
    estimated_noise: float | None = Field(
        None, description="Fraction of examples the weights down-weighted in the latest report (N*w < 1/4).")
    class_mean_weight: list[float | None] = Field(default_factory=list,
                                                  description="Mean N*w per class: low means noisy labels.")
    spec_hash: str
    parameters: NonNegativeInt = Field(description="Number of model parameters.")


class PredictRequest(BaseModel):
    """Inputs in the job's record format: JSON records' values (objects or arrays) for the json
    format, base64 strings of the record bytes for raw and image."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[Any] = Field(min_length=1, max_length=1024)


class Prediction(_Out):
    label: int
    probabilities: list[float]


class PredictResponse(_Out):
    checkpoint: str
    step: NonNegativeInt
    predictions: list[Prediction]


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("stopped over REST", max_length=500)


class ErrorBody(_Out):
    """Every error response: a stable machine-readable code, a message for people, and the
    offending field for validation errors."""

    code: str = Field(description="e.g. job_not_found, job_conflict, invalid_request, unauthorized.")
    message: str
    field: str | None = Field(None, description="The request field at fault (dotted path), when one is.")
    details: list[dict[str, Any]] | None = None
