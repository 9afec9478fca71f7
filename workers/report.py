"""What a running job says about itself, and how it ended: one definition of every field, read by
the CLI's progress line and summary, and by the service's store, metrics and dashboard.

Imports pydantic only (no torch, Ray or Kafka client): the service reads reports without them.
Non-finite numbers become None (``null`` in JSON): a metric that is undefined (no clean labels
yet, no step since the last report) is absent, never ``NaN``, so ``--json`` output is valid JSON.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, field_validator

JobState = Literal["finished", "stopped", "failed"]
# A job's state while it runs (pending: submitted, no report from its workers yet), then how it ended.
JobStatus = Literal["pending", "running", "finished", "stopped", "failed"]


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class _Metrics(BaseModel):
    """Frozen, closed to unknown fields, and every non-finite number read as None."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return _finite_or_none(value)


class CICWStepStats(_Metrics):
    """What the weights did to the last global batch of the report (see cicw.CICWDiagnostics)."""

    num_examples: NonNegativeFloat = Field(description="N, the global batch size.")
    ess: float | None = Field(None, description="Effective sample size of the instance weights, 1/sum w^2.")
    low_weight_fraction: float | None = Field(None, description="Fraction of examples with N*w < 1/4.")
    weight_histogram: list[float] = Field(default_factory=list,
                                          description="Counts of N*w per bin of cicw WEIGHT_HISTOGRAM_EDGES.")
    class_count: list[float] = Field(default_factory=list, description="Examples per given label.")
    class_mean_weight: list[float | None] = Field(
        default_factory=list, description="Mean N*w per given label (a per-class noise estimate); None where "
                                          "the label is absent from the batch.")
    class_mass_moved: float | None = Field(None, description="Mean label mass the class weights moved.")
    lam: float | None = Field(None, description="The instance-weight temperature in force.")
    in_burn_in: bool = Field(False, description="True while weights are still uniform (burn-in).")


class JobReport(_Metrics):
    """One report of a job's workers: rank 0's view of global counters and of the metrics of the
    steps since the previous report. Counters (step, examples, rejected) are the job's totals
    across runs of the same job id; rates and averages cover the steps since the last report."""


    step: NonNegativeInt = Field(description="Optimizer steps taken.")
    examples: NonNegativeInt = Field(description="Records trained into the model.")
    rejected: NonNegativeInt = Field(0, description="Records sent to the dead-letter topic.")
    lag: NonNegativeInt | None = Field(None, description="Records on the job's partitions not yet read, by "
                                                         "the last known end offsets.")
    records_per_s: float | None = Field(None, description="Records trained per second since the last report.")
    loss: float | None = Field(None, description="Mean weighted training loss since the last report.")
    prequential_accuracy: float | None = Field(
        None, description="Accuracy on each batch before training on it (test-then-train), against the "
                          "given labels.")
    noise_precision: float | None = Field(
        None, description="Of the down-weighted examples with a clean-label header, the fraction whose label "
                          "was wrong (cumulative).")
    noise_recall: float | None = Field(
        None, description="Of the wrong labels (clean-label header differs), the fraction down-weighted "
                          "(cumulative).")
    cicw: CICWStepStats | None = Field(None, description="The weights on the report's last step.")
    eval_accuracy: float | None = Field(None, description="Accuracy on the clean evaluation set.")
    eval_loss: float | None = Field(None, description="Cross entropy on the clean evaluation set.")
    eval_examples: NonNegativeInt | None = Field(None, description="Size of the clean evaluation set.")
    offset_resets: NonNegativeInt = Field(
        0, description="Partition positions reset under source.offset_reset in this run, because the broker no "
                        "longer had them (each is logged with what was skipped or replayed).")
    stalled_s: NonNegativeFloat = Field(0.0, description="Seconds the broker has been unreachable (0: healthy).")
    stall_reason: str | None = Field(None, description="The client's error while stalled.")
    checkpoint_step: NonNegativeInt | None = Field(
        None, description="Set when this report was written with a durable checkpoint at this step.")
    checkpoint_postponed: str | None = Field(
        None, description="Why a due checkpoint was put off (dead letters not yet delivered).")
    offsets: dict[int, NonNegativeInt] | None = Field(
        None, description="Partition -> next offset to read, as the checkpoint of this report holds them.")
    final: bool = Field(False, description="The job's last report.")
    stopped: str | None = Field(None, description="The stop request's reason, when a stop ended the job.")


class JobResult(BaseModel):
    """How a job ended: ``finished`` (bounded source drained or max_steps), ``stopped`` (on
    request, after a final checkpoint: run it again to resume) or ``failed`` (``error`` says why).

    ``checkpoint`` is the latest durable checkpoint, whatever the state: a failed job names the
    one a rerun resumes from (a local path, or a URI such as s3://bucket/...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    job_id: str
    state: JobState
    report: JobReport | None = Field(None, description="The last report received (None if none was).")
    checkpoint: str | None = Field(None, description="The latest durable checkpoint, the one a rerun resumes from.")
    checkpoint_step: NonNegativeInt | None = Field(None, description="The step that checkpoint was written at.")
    error: str | None = Field(None, description="Why the job failed (the workers' own exception).")
    rank_errors: dict[int, str] = Field(
        default_factory=dict, description="A failed job's exception (type: message) on each worker rank that raised "
                                          "one (a rank missing here was stopped by Ray after another failed).")
