"""Records to tensors. A record that cannot be decoded or validated is rejected with a reason,
never dropped silently: the caller routes rejections to the dead-letter topic."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from .records import CodecSpec, ImageFormat, JsonFormat, JsonValue, KafkaRecord, RawFormat


class RecordRejected(ValueError):
    """A record's bytes or contents are invalid; ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    record: KafkaRecord
    reason: str


@dataclass
class DecodedBatch:
    """Tensors of the accepted records, in fetch order, and the offsets the batch consumed.

    inputs: [n, *input_shape] float32; targets: [n] int64, or [n, K] float32 if any record
    carried a probability row (index labels become one-hot then); clean_labels: [n] int64,
    -1 where a record had no clean-label header. ``next_offsets`` counts rejected records too:
    they are consumed (sent to the dead-letter topic), never read again.
    """

    inputs: Tensor
    targets: Tensor
    clean_labels: Tensor
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def decode_batch(records: Sequence[KafkaRecord], spec: CodecSpec) -> DecodedBatch:
    """Decode and validate ``records`` with ``spec``; invalid ones land in ``rejected``."""
    if isinstance(spec.format, RawFormat):
        return _decode_raw_batch(records, spec.format, spec)
    xs: list[np.ndarray] = []
    ys: list[int | np.ndarray] = []
    clean: list[int] = []
    rejected: list[Rejection] = []
    next_offsets: dict[tuple[str, int], int] = {}
    for rec in records:
        tp = (rec.topic, rec.partition)
        next_offsets[tp] = max(next_offsets.get(tp, 0), rec.offset + 1)
        try:
            x, y = decode_record(rec, spec)
            c = _clean_label(rec, spec)
        except RecordRejected as exc:
            rejected.append(Rejection(rec, exc.reason))
            continue
        xs.append(x)
        ys.append(y)
        clean.append(c)
    n = len(xs)
    inputs = torch.from_numpy(np.stack(xs)) if n else torch.zeros((0, *spec.input_shape))
    if any(isinstance(y, np.ndarray) for y in ys):
        rows = [y if isinstance(y, np.ndarray) else np.eye(spec.num_classes, dtype=np.float32)[y] for y in ys]
        targets = torch.from_numpy(np.stack(rows))
    else:
        targets = torch.tensor(ys, dtype=torch.int64)
    return DecodedBatch(inputs=inputs.float(), targets=targets,
                        clean_labels=torch.tensor(clean, dtype=torch.int64),
                        next_offsets=next_offsets, rejected=rejected)


def _decode_raw_batch(records: Sequence[KafkaRecord], fmt: RawFormat, spec: CodecSpec) -> DecodedBatch:
    # Same checks as decode_record, but the bytes of all valid records are converted in one
    # frombuffer call instead of one per record (the ingest path's per-record cost).
    dtype = np.dtype(fmt.dtype).newbyteorder("<")
    expected = math.prod(spec.input_shape) * dtype.itemsize
    values: list[bytes] = []
    kept: list[KafkaRecord] = []
    labels: list[int] = []
    clean: list[int] = []
    rejected: list[Rejection] = []
    next_offsets: dict[tuple[str, int], int] = {}
    for rec in records:
        tp = (rec.topic, rec.partition)
        next_offsets[tp] = max(next_offsets.get(tp, 0), rec.offset + 1)
        try:
            if rec.value is None:
                raise RecordRejected("empty value (tombstone)")
            if len(rec.value) != expected:
                raise RecordRejected(f"raw value has {len(rec.value)} bytes, expected {expected} "
                                     f"({fmt.dtype} x {list(spec.input_shape)})")
            label, c = _label(rec, fmt.label_from, spec), _clean_label(rec, spec)
        except RecordRejected as exc:
            rejected.append(Rejection(rec, exc.reason))
            continue
        values.append(rec.value)
        kept.append(rec)
        labels.append(label)
        clean.append(c)
    x = np.frombuffer(b"".join(values), dtype=dtype).reshape(len(values), *spec.input_shape).astype(np.float32)
    if dtype.kind == "f":
        finite = np.isfinite(x.reshape(len(values), -1)).all(axis=1)
        if not finite.all():
            rejected += [Rejection(r, "features contain NaN or infinity") for r, ok in zip(kept, finite) if not ok]
            position = {id(rec): i for i, rec in enumerate(records)}
            rejected.sort(key=lambda r: position[id(r.record)])  # fetch order, as decode_batch
            x = x[finite]
            labels = [v for v, ok in zip(labels, finite) if ok]
            clean = [v for v, ok in zip(clean, finite) if ok]
    return DecodedBatch(inputs=torch.from_numpy(x), targets=torch.tensor(labels, dtype=torch.int64),
                        clean_labels=torch.tensor(clean, dtype=torch.int64), next_offsets=next_offsets,
                        rejected=rejected)


def decode_record(rec: KafkaRecord, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray]:
    """One record's features (float32, ``spec.input_shape``) and label. Raises RecordRejected."""
    value = rec.value
    if value is None:
        raise RecordRejected("empty value (tombstone)")
    if len(value) > spec.max_record_bytes:
        raise RecordRejected(f"value of {len(value)} bytes exceeds max_record_bytes={spec.max_record_bytes}")
    fmt = spec.format
    if isinstance(fmt, JsonFormat):
        x, y = _decode_json(value, spec)
    elif isinstance(fmt, RawFormat):
        x = _decode_raw(value, fmt, spec)
        y = _label(rec, fmt.label_from, spec)
    else:
        x = _decode_image(value, fmt, spec)
        y = _label(rec, fmt.label_from, spec)
    if not np.isfinite(x).all():
        raise RecordRejected("features contain NaN or infinity")
    return x, y


def _decode_json(value: bytes, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray]:
    try:
        parsed = JsonValue.model_validate(json.loads(value))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordRejected(f"value is not JSON: {exc}") from exc
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "value" for e in exc.errors())
        raise RecordRejected(f"JSON value has invalid field(s): {fields}") from exc
    try:
        x = np.asarray(parsed.x)  # no dtype: numpy would parse strings such as "nan" as floats
    except (ValueError, TypeError) as exc:
        raise RecordRejected(f"x is not a rectangular array of numbers: {exc}") from exc
    if x.dtype.kind not in "iuf":
        raise RecordRejected(f"x is not a rectangular array of numbers (found {x.dtype.name} values)")
    x = x.astype(np.float32)
    if x.size != math.prod(spec.input_shape):
        raise RecordRejected(f"x has shape {list(x.shape)}, expected {list(spec.input_shape)}")
    return x.reshape(spec.input_shape), _validate_label(parsed.y, spec)


def _decode_raw(value: bytes, fmt: RawFormat, spec: CodecSpec) -> np.ndarray:
    dtype = np.dtype(fmt.dtype).newbyteorder("<")
    expected = math.prod(spec.input_shape) * dtype.itemsize
    if len(value) != expected:
        raise RecordRejected(f"raw value has {len(value)} bytes, expected {expected} "
                             f"({fmt.dtype} x {list(spec.input_shape)})")
    return np.frombuffer(value, dtype=dtype).astype(np.float32).reshape(spec.input_shape)


def _decode_image(value: bytes, fmt: ImageFormat, spec: CodecSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if len(spec.input_shape) != 3 or spec.input_shape[0] not in (1, 3):
        raise RecordRejected(f"image format needs input_shape [C, H, W] with C in (1, 3), got {list(spec.input_shape)}")
    c, h, w = spec.input_shape
    try:
        with Image.open(io.BytesIO(value)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise RecordRejected(f"image format {img.format} is not PNG or JPEG")
            arr = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RecordRejected(f"value is not a decodable image: {exc}") from exc
    if arr.shape[:2] != (h, w):
        raise RecordRejected(f"image is {arr.shape[1]}x{arr.shape[0]}, expected {w}x{h}")
    x = (arr.reshape(h, w, c).transpose(2, 0, 1) / 255.0).astype(np.float32)
    if fmt.mean is not None and fmt.std is not None:
        x = (x - np.asarray(fmt.mean, np.float32).reshape(-1, 1, 1)) / np.asarray(fmt.std, np.float32).reshape(-1, 1, 1)
    return x


def _label(rec: KafkaRecord, source: str, spec: CodecSpec) -> int:
    raw = rec.header(spec.label_header) if source == "header" else rec.key
    where = f"header {spec.label_header!r}" if source == "header" else "key"
    if raw is None:
        raise RecordRejected(f"no label: {where} missing")
    try:
        label = int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordRejected(f"label in {where} is not an integer: {raw[:20]!r}") from exc
    return _validate_label(label, spec)  # type: ignore[return-value]


def _validate_label(y: int | list[float], spec: CodecSpec) -> int | np.ndarray:
    if isinstance(y, int):
        if not 0 <= y < spec.num_classes:
            raise RecordRejected(f"label {y} out of range [0, {spec.num_classes})")
        return y
    row = np.asarray(y, dtype=np.float32)
    if row.shape != (spec.num_classes,):
        raise RecordRejected(f"label row has {row.size} entries, expected {spec.num_classes}")
    if not np.isfinite(row).all() or (row < 0).any() or abs(float(row.sum()) - 1.0) > 1e-4:
        raise RecordRejected("label row is not a probability vector (non-negative, sums to 1)")
    return row


def _clean_label(rec: KafkaRecord, spec: CodecSpec) -> int:
    raw = rec.header(spec.clean_label_header)
    if raw is None:
        return -1
    try:
        label = int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordRejected(f"clean label header is not an integer: {raw[:20]!r}") from exc
    if not 0 <= label < spec.num_classes:
        raise RecordRejected(f"clean label {label} out of range [0, {spec.num_classes})")
    return label
