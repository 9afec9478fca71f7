"""What arrives on Kafka and how a job says to read it: typed models at the source boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


@dataclass(frozen=True)
class KafkaRecord:
    """One fetched record, independent of the client library that fetched it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = field(default=())
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        """The last header called ``name`` (Kafka allows repeats), or None."""
        for k, v in reversed(self.headers):
            if k == name:
                return v
        return None


class JsonValue(BaseModel):
    """The value of a ``json`` record: features, a class index or probability row, optional ids."""

    model_config = ConfigDict(extra="ignore")

    x: float | list  # type: ignore[type-arg]  # nested lists of numbers; shape checked by the codec
    y: int | list[float]
    id: str | None = None
    source: str | None = None


LabelSource = Literal["header", "key"]


class JsonFormat(BaseModel):
    """Value is JSON: {"x": number or nested list, "y": class index or probabilities, ...}."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["json"] = "json"


class RawFormat(BaseModel):
    """Value is a contiguous little-endian tensor; the label is in a header or the key."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["raw"] = "raw"
    dtype: Literal["float32", "float64", "float16", "uint8", "int8", "int16", "int32"] = "float32"
    label_from: LabelSource = "header"


class ImageFormat(BaseModel):
    """Value is PNG or JPEG bytes (decoded with Pillow); the label is in a header or the key.
    Pixels are scaled to [0, 1], then normalised with ``mean``/``std`` per channel if given."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["image"] = "image"
    label_from: LabelSource = "header"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


RecordFormat = Annotated[JsonFormat | RawFormat | ImageFormat, Field(discriminator="kind")]


class CodecSpec(BaseModel):
    """How one job turns records into tensors. ``input_shape`` is per example (e.g. [1, 28, 28])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: RecordFormat = Field(default_factory=JsonFormat)
    input_shape: tuple[PositiveInt, ...] = Field(description="Shape of one example's features.")
    num_classes: int = Field(ge=2, description="Labels are class indices in [0, num_classes).")
    max_record_bytes: PositiveInt = Field(1 << 20, description="Larger values are rejected.")
    label_header: str = "label"
    clean_label_header: str = Field("clean_label", description="Optional true label (synthetic noise).")
