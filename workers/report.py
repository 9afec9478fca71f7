"""What a running job says about itself, and how it ended: one definition of every field, read by
the CLI's progress line and summary, and by the service's store, metrics and dashboard.

Imports pydantic and cicw.config only (no torch, Ray or Kafka client): the service reads reports
without them.
Non-finite numbers become None (``null`` in JSON): a metric that is undefined (no clean labels
yet, no step since the last report) is absent, never ``NaN``, so ``--json`` output is valid JSON.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, field_validator, model_validator

from cicw.config import WEIGHT_HISTOGRAM_EDGES

JobState = Literal["finished", "stopped", "failed"]
# A job's state while it runs (pending: submitted, no report from its workers yet), then how it ended.
JobStatus = Literal["pending", "running", "finished", "stopped", "failed"]
# Upper edges (seconds) of the optimizer-step duration histogram, the ``le`` buckets of the
# service's cicw_step_duration_seconds: 5 ms (a small MLP step on a CPU) to 10 s (a large model
# on a slow device); a last, open bin holds the steps above 10 s.
STEP_SECONDS_EDGES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
    in_burn_in: bool = Field(False, description="True while weights are still out of the loss (burn-in, or "
                                                "the memorization gate still shut).")
    generalisation_gap: float | None = Field(
        None, description="Memorization gate: running mean cross entropy of held-out examples minus that of "
                          "trained-on ones (nats); the gate opens when it is significant. None without the gate.")
    weights_from_step: int | None = Field(
        None, description="The step from which the weights are in the loss (None: not known yet, the gate is shut).")

    @field_validator("weight_histogram")
    @classmethod
    def _one_count_per_bin(cls, counts: list[float]) -> list[float]:
        bins = len(WEIGHT_HISTOGRAM_EDGES) - 1
        if counts and len(counts) != bins:
            raise ValueError(f"has {len(counts)} counts; cicw's WEIGHT_HISTOGRAM_EDGES make {bins} bins")
        return counts


class _LabelQuality(_Metrics):
    """What the job saw of the labels of one source or one given class, over its life (see
    workers.train.label_quality for the estimator and its calibration)."""

    records: NonNegativeInt = Field(description="Records trained.")
    weighed: NonNegativeInt = Field(0, description="Of them, records trained after burn-in (weights in force).")
    mean_weight: float | None = Field(None, description="Mean N*w of the weighed records (1 = uniform).")
    down_weighted_fraction: float | None = Field(None, description="Fraction of the weighed records with N*w < 1/4.")
    disagreement: float | None = Field(
        None, description="Fraction of the weighed records the model predicted another class for than given, "
                          "before training on them (the uncalibrated noise estimate).")
    estimated_noise: float | None = Field(
        None, description="Estimated fraction of wrong given labels: the disagreement corrected by the model's "
                          "error (label_model_error), assuming symmetric noise.")
    true_noise: float | None = Field(
        None, description="Of the weighed records with a clean-label header, the fraction given a wrong label.")


class SourceQuality(_LabelQuality):
    """Label quality of one source (a record's ``source``; "unknown" for records naming none,
    "other" for the sources past the job's max_sources largest)."""

    source: str


class ClassQuality(_LabelQuality):
    """Label quality of the records given one class."""

    label: NonNegativeInt


class JobReport(_Metrics):
    """One report of a job's workers: rank 0's view of global counters and of the metrics of the
    steps since the previous report. Counters (step, examples, rejected) are the job's totals
    across runs of the same job id; rates and averages cover the steps since the last report;
    the step-time histogram and checkpoint time cover the current run of the workers (they start
    again from zero when the workers restart or the job resumes)."""

    step: NonNegativeInt = Field(description="Optimizer steps taken.")
    examples: NonNegativeInt = Field(description="Records trained into the model.")
    rejected: NonNegativeInt = Field(0, description="Records sent to the dead-letter topic.")
    lag: NonNegativeInt | None = Field(None, description="Records on the job's partitions not yet read, by "
                                                         "the last known end offsets.")
    lag_per_partition: dict[NonNegativeInt, NonNegativeInt] = Field(
        default_factory=dict, description="Partition -> records not yet read (``lag`` per partition, every rank's "
                                          "partitions); a partition whose end offset is not known yet is absent.")
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
    suspects_published: NonNegativeInt = Field(0, description="Records published to the suspects topic (job "
                                                             "total; repeats after a restart included).")
    suspects_precision: float | None = Field(
        None, description="Of the suspects with a clean-label header, the fraction whose label was wrong (cumulative).")
    suspects_recall: float | None = Field(
        None, description="Of the wrong labels (clean-label header) trained while suspects were published, the "
                          "fraction published (cumulative).")
    cicw: CICWStepStats | None = Field(None, description="The weights on the report's last step.")
    sources: list[SourceQuality] = Field(
        default_factory=list, description="Label quality per source (job totals), most records first: at most "
                                          "max_sources names, then \"other\".")
    classes: list[ClassQuality] = Field(default_factory=list,
                                        description="Label quality per given class (job totals).")
    label_model_error: float | None = Field(
        None, description="The model's error the noise estimates are corrected by: against the clean-label header "
                          "where records carry one, else 1 - eval_accuracy; None: uncorrected.")
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
    checkpoint_seconds: NonNegativeFloat | None = Field(
        None, description="Wall time rank 0 took to write the latest checkpoint of this run of the workers (from "
                          "flushing its dead letters to its directory written; the upload to checkpoint storage "
                          "that follows is not included). Set on the report written with a checkpoint and kept "
                          "in later reports; None before the run's first checkpoint.")
    checkpoint_postponed: str | None = Field(
        None, description="Why a due checkpoint was put off (dead letters not yet delivered).")
    offsets: dict[int, NonNegativeInt] | None = Field(
        None, description="Partition -> next offset to read, as the checkpoint of this report holds them.")
    step_seconds_buckets: list[NonNegativeInt] = Field(
        default_factory=list, description="Rank 0's optimizer steps by wall time since its workers (re)started: "
                                          "one count per bin of STEP_SECONDS_EDGES (seconds <= edge, above the "
                                          "previous edge), then the steps above the last edge. Empty in reports "
                                          "of workers older than this field.")
    step_seconds_sum: NonNegativeFloat = Field(0.0, description="Total wall time of the steps counted in "
                                                                "step_seconds_buckets.")
    step_seconds_count: NonNegativeInt = Field(0, description="Steps counted in step_seconds_buckets.")
    final: bool = Field(False, description="The job's last report.")
    stopped: str | None = Field(None, description="The stop request's reason, when a stop ended the job.")

    @model_validator(mode="after")
    def _step_histogram_adds_up(self) -> JobReport:
        buckets = self.step_seconds_buckets
        if buckets and len(buckets) != len(STEP_SECONDS_EDGES) + 1:
            raise ValueError(f"step_seconds_buckets has {len(buckets)} counts; STEP_SECONDS_EDGES has "
                             f"{len(STEP_SECONDS_EDGES)} edges, so it needs {len(STEP_SECONDS_EDGES) + 1}")
        if sum(buckets) != self.step_seconds_count:
            raise ValueError(f"step_seconds_buckets add up to {sum(buckets)}, step_seconds_count is "
                             f"{self.step_seconds_count}")
        return self


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
