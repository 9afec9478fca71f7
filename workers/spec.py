"""JobSpec: everything one training job needs, as one validated model. The CLI reads it from
YAML or JSON, and the REST service will accept the same document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from cicw.config import CICWConfig

from .kafka.records import CodecSpec
from .kafka.source import SourceSpec


class ModelSpec(BaseModel):
    """The network: a factory and its keyword arguments (it gets the input shape and class count)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field("mlp", description="A registered model (mlp, small_cnn, preact_resnet18) or "
                                         "'package.module:factory' from a package the operator allow-listed "
                                         "in $CICW_MODEL_PACKAGES.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the factory.")


class OptimizerSpec(BaseModel):
    """Optimizer and its step-wise learning-rate schedule (MultiStepLR over optimizer steps)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Literal["sgd", "adamw"] = Field("sgd", description="torch.optim.SGD or AdamW.")
    lr: PositiveFloat = Field(0.05, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by AdamW).")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD when momentum > 0.")
    weight_decay: float = Field(5e-4, ge=0, description="L2 penalty (decoupled for AdamW).")
    lr_milestones: list[PositiveInt] = Field(default_factory=list, description="Steps where lr *= lr_gamma.")
    lr_gamma: PositiveFloat = Field(0.1, description="Factor applied to the LR at each milestone.")


class ScalingSpec(BaseModel):
    """Ray Train workers: W data-parallel ranks; partition p is read by rank p mod W."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_workers: PositiveInt = Field(2, description="Data-parallel workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU and gloo otherwise.")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs Ray reserves per worker.")


class CheckpointSpec(BaseModel):
    """When and where the model, optimizer, schedules, counters and offsets are saved as one unit
    (also at the end of a bounded job and on a stop). Ray Train takes one checkpoint per poll of
    its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): checkpoints due more often
    than that make training wait for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    every_steps: PositiveInt | None = Field(None, description="Checkpoint every N optimizer steps ...")
    every_s: PositiveFloat | None = Field(60.0, description="... and/or every T seconds: after a crash, at "
                                                            "most this much training is redone.")
    keep: PositiveInt = Field(3, description="Checkpoints kept (the newest).")
    storage_path: str = Field("./checkpoints", description="Local directory or pyarrow filesystem URI (s3://...).")

class EvaluationSpec(BaseModel):
    """Where the clean evaluation set comes from and how often it is scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    every_steps: PositiveInt = Field(200, description="Score the evaluation set every N optimizer steps.")
    topic: str | None = Field(None, description="A topic on the job's brokers, read from the start to its "
                                                "end when the job starts, decoded with the job's codec.")
    path: str | None = Field(None, description="An .npz file with x [N, *input_shape] as the model takes it "
                                               "(what the codec outputs) and y [N] class indices.")
    max_examples: PositiveInt = Field(10_000, description="Examples kept (the first ones).")
    batch_size: PositiveInt = 512

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSpec:
        if (self.topic is None) == (self.path is None):
            raise ValueError("give exactly one of 'topic' or 'path'")
        return self


class SuspectsSpec(BaseModel):
    """A review queue for suspect labels: after burn-in, records whose normalised instance weight
    N*w falls below ``max_weight`` are published, unchanged, with the given label, the model's
    predicted class and probability, the weight, the step and the source coordinates in headers.
    A reviewer produces corrected records again on the training topic. Delivered at least once
    (a checkpoint waits for them; dedupe on the source topic/partition/offset headers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    topic: str | None = Field(None, min_length=1, max_length=249,
                              description="Where suspects go; default <source topic>.suspects.")
    max_weight: float = Field(
        0.1, gt=0, lt=1, description="Publish records with N*w below this (N*w = 1 is an average record). 0.1 "
                                     "favours precision over the down-weighted rule's 0.25: a reviewer's time is "
                                     "the cost (at 40% symmetric noise, ~0.9 of suspects are mislabelled).")
    after_steps: NonNegativeInt = Field(0, description="Steps after burn-in before publishing starts (lets the "
                                                       "weights settle past the CICW anneal).")

    def topic_for(self, source_topic: str) -> str:
        """The suspects topic of a job reading ``source_topic``."""
        return self.topic if self.topic is not None else source_topic + ".suspects"


class JobSpec(BaseModel):
    """One training job. Running it again with the same ``job_id`` and storage resumes it from
    its latest checkpoint, offsets included."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
                        description="Also names the consumer group cicw-<job_id>.")
    source: SourceSpec = Field(description="The topic and how to read it.")
    codec: CodecSpec = Field(description="How records become tensors.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    cicw: CICWConfig = Field(default_factory=CICWConfig)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    evaluation: EvaluationSpec | None = Field(None, description="A clean evaluation set scored every N steps.")
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    seed: NonNegativeInt = Field(
        0, description="Seeds the model's initial weights and every rank's mixup and augmentation draws; "
                       "checkpoints carry the generators' states, so a resumed job draws what it would have.")
    report_every_steps: PositiveInt = Field(10, description="Metrics are reported this often.")
    max_sources: PositiveInt = Field(
        20, le=1000, description="Label quality is reported for the sources with the most records, up to this "
                                 "many; the rest are counted together as \"other\" (bounds the metrics' labels).")
    suspects: SuspectsSpec | None = Field(None, description="Publish suspect labels to a topic for review.")
    max_failures: NonNegativeInt = Field(2, description="Worker failures survived by restarting from the checkpoint.")
    record_log_dir: str | None = Field(
        None, description="Audit log: each rank appends, per optimizer step, the (partition, offset) of the "
                          "records it trained on, as JSON lines (rank<N>.jsonl). Off by default.")

    @property
    def consumer_group(self) -> str:
        return f"cicw-{self.job_id}"

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        """Read YAML (.yaml/.yml) or JSON; raises pydantic's ValidationError naming the field."""
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data)
