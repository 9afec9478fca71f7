"""What a checkpoint was written for, readable without torch: ``meta.json`` beside ``state.pt``.

It names the job, the topic and how many partitions it had, a hash of the parts of the spec
that define the data (the topic and the codec), the step and example counters, and the offsets
the checkpoint resumes from. The worker checks it before restoring, and the runner in its
preflight, so resuming a job on other data fails in seconds naming what differs; the service
lists checkpoints from it. Changing the number of workers between runs is fine: offsets are per
partition, not per rank.

Imports pydantic only (no torch, Ray or Kafka client).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    model_validator,
)

from ..errors import CheckpointError
from ..spec import JobSpec

# Version 2: meta.json beside state.pt, and a state.pt that torch.load(weights_only=True) reads.
CHECKPOINT_FORMAT = 2
META_FILE = "meta.json"
# Codec settings that do not change what a record means, so a resumed job may change them: a
# size limit (it decides only which future records are dead-lettered), the header of the clean
# label and of the source (metrics only) and the training-time augmentation.
_DATA_NEUTRAL_CODEC_FIELDS = frozenset({"max_record_bytes", "clean_label_header", "source_field"})
_DATA_NEUTRAL_FORMAT_FIELDS = frozenset({"augment"})


def data_definition(spec: JobSpec) -> dict[str, Any]:
    """The parts of ``spec`` that define the data a checkpoint learned from, as canonical JSON
    values: the topic and the codec's settings that differ from their defaults (so a codec field
    added later with a default does not change the hash of older checkpoints), the format's
    ``kind`` always (it tells the formats apart even with every other field at its default)."""
    codec = spec.codec.model_dump(mode="json", exclude_defaults=True, exclude=set(_DATA_NEUTRAL_CODEC_FIELDS))
    fmt = spec.codec.format
    codec["format"] = {"kind": fmt.kind, **fmt.model_dump(mode="json", exclude_defaults=True,
                                                          exclude=set(_DATA_NEUTRAL_FORMAT_FIELDS))}
    return {"topic": spec.source.topic, "codec": codec}


def data_hash(spec: JobSpec) -> str:
    """sha256 (hex) of :func:`data_definition` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(data_definition(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class CheckpointMeta(BaseModel):
    """The identity and position of one checkpoint (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = Field(default=CHECKPOINT_FORMAT, description="Layout of the checkpoint directory.")
    job_id: str = Field(description="The job that wrote it; only that job resumes from it.")
    topic: str = Field(description="The topic it trained on.")
    partition_count: NonNegativeInt = Field(description="Partitions of the topic when it was written.")
    data_hash: str = Field(description="sha256 of the topic and codec settings (see data_hash).")
    codec: dict[str, Any] = Field(default_factory=dict,
                                  description="The codec settings hashed, to name what differs on a mismatch.")
    step: NonNegativeInt = Field(description="Optimizer steps taken.")
    examples: NonNegativeInt = Field(description="Records trained into the model.")
    offsets: dict[int, NonNegativeInt] = Field(description="Partition -> next offset to read.")
    written_at: datetime = Field(description="When rank 0 wrote it (UTC).")

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointMeta:
        if self.format_version != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format version {self.format_version} is not {CHECKPOINT_FORMAT}")
        beyond = sorted(p for p in self.offsets if not 0 <= p < self.partition_count)
        if beyond:
            raise ValueError(f"offsets for partitions {beyond} outside the topic's {self.partition_count}")
        return self

    @classmethod
    def for_spec(cls, spec: JobSpec, *, partition_count: int, step: int, examples: int,
                 offsets: dict[int, int]) -> CheckpointMeta:
        """The meta of a checkpoint that ``spec``'s job writes now."""
        return cls(job_id=spec.job_id, topic=spec.source.topic, partition_count=partition_count,
                   data_hash=data_hash(spec), codec=data_definition(spec)["codec"], step=step,
                   examples=examples, offsets=offsets, written_at=datetime.now(UTC))

    def check_resumable(self, spec: JobSpec) -> None:
        """Raise CheckpointError naming what differs when ``spec`` must not resume from this
        checkpoint: another job id, another topic, or a codec that reads records differently."""
        if self.job_id != spec.job_id:
            raise CheckpointError(f"the checkpoint belongs to job {self.job_id!r}, not {spec.job_id!r}")
        if self.topic != spec.source.topic:
            raise CheckpointError(f"job {spec.job_id!r} was trained on topic {self.topic!r}; the spec names "
                                  f"{spec.source.topic!r}: use a new job_id to train on other data")
        if self.data_hash != data_hash(spec):
            now = data_definition(spec)["codec"]
            differs = sorted(k for k in {*self.codec, *now} if self.codec.get(k) != now.get(k))
            detail = ", ".join(f"{k}: {self.codec.get(k)!r} -> {now.get(k)!r}" for k in differs)
            raise CheckpointError(f"job {spec.job_id!r}: the spec's codec reads records differently from the "
                                  f"checkpoint's ({detail or 'data hash differs'}); use a new job_id")


def read_bytes(location: str | Path, name: str) -> bytes:
    """The file ``name`` of a checkpoint directory: a local path or a pyarrow filesystem URI
    (``s3://bucket/.../checkpoint_...``, credentials and endpoint from the standard AWS
    environment). Raises CheckpointError when it cannot be read."""
    try:
        if "://" in str(location):
            from pyarrow.fs import FileSystem

            fs, path = FileSystem.from_uri(str(location))
            with fs.open_input_file(f"{path.rstrip('/')}/{name}") as f:
                return bytes(f.read())
        return (Path(location) / name).read_bytes()
    except (OSError, ValueError) as exc:  # pyarrow raises both (ArrowInvalid is a ValueError)
        raise CheckpointError(f"cannot read {name} of checkpoint {location}: {exc}") from exc


def read_meta(location: str | Path) -> CheckpointMeta:
    """The :class:`CheckpointMeta` of the checkpoint at ``location`` (see :func:`read_bytes`).
    Raises CheckpointError when it is missing, malformed, or of another format version."""
    raw = read_bytes(location, META_FILE)
    try:
        return CheckpointMeta.model_validate_json(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{META_FILE} of checkpoint {location} is not valid: {exc}") from exc


def write_meta(directory: str | Path, meta: CheckpointMeta) -> Path:
    """Write ``meta`` as ``directory``/meta.json (replaced whole: a reader never sees half)."""
    path = Path(directory) / META_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(meta.model_dump_json(indent=2))
    tmp.replace(path)
    return path
