"""Records to tensors. A record that cannot be decoded or validated is rejected with a reason,
never dropped silently: the caller routes rejections to the dead-letter topic."""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from .records import CodecSpec, ImageFormat, JsonFormat, JsonValue, KafkaRecord, RawFormat, RecordChunk
from ..errors import RecordRejected


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
    """Decode and validate ``records`` with ``spec``; invalid ones land in ``rejected``.

    ``records`` is a RecordChunk (what KafkaSource hands out) or any sequence of KafkaRecord.
    A rejection holds the very record object that ``records`` yields at its position.
    """
    if isinstance(spec.format, RawFormat):
        chunk = RecordChunk.of_records(records)
        if chunk is not None:
            return _decode_raw_chunk(chunk, spec.format, spec)
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


# Labels are parsed through a table of the canonical spellings ("0" .. "K-1"); anything else
# (absent, "07", " 3", out of range, not a number) misses it and takes the per-record checks,
# which accept or reject it exactly as decode_record does. Beyond this many classes the table
# costs more than it saves and every label takes the per-record path.
_LABEL_TABLE_MAX_CLASSES = 1 << 16
_ABSENT = object()  # no clean-label header at all (not the same as a header without a value)


@functools.lru_cache(maxsize=8)
def _label_tables(num_classes: int) -> tuple[dict[object, int], dict[object, int]]:
    if num_classes > _LABEL_TABLE_MAX_CLASSES:
        return {}, {}
    labels: dict[object, int] = {str(i).encode(): i for i in range(num_classes)}
    return labels, {**labels, _ABSENT: -1}


def _decode_raw_chunk(chunk: RecordChunk, fmt: RawFormat, spec: CodecSpec) -> DecodedBatch:
    # The checks of decode_record, done a column at a time: values, labels and clean labels
    # are read as lists and checked in bulk, all valid values are converted by one frombuffer,
    # and a record is looked at on its own only when a bulk check flags it (then to find the
    # reason, or to parse an unusual but valid label such as "07").
    dtype = np.dtype(fmt.dtype).newbyteorder("<")
    expected = math.prod(spec.input_shape) * dtype.itemsize
    values = chunk.values()
    label_table, clean_table = _label_tables(spec.num_classes)
    if fmt.label_from == "header":
        raw_labels, raw_clean = chunk.header_columns((spec.label_header, spec.clean_label_header), _ABSENT)
    else:
        raw_labels, raw_clean = chunk.keys(), chunk.header_values(spec.clean_label_header, _ABSENT)
    labels: list[int | None] = list(map(label_table.get, raw_labels))
    clean: list[int | None] = list(map(clean_table.get, raw_clean))
    try:
        flagged = not (set(map(len, values)) <= {expected} and expected <= spec.max_record_bytes)
    except TypeError:  # len(None): a tombstone
        flagged = True
    if not flagged:
        try:  # a None (a label the table lacks) makes this fail
            targets, clean_labels = np.array(labels, dtype=np.int64), np.array(clean, dtype=np.int64)
        except TypeError:
            flagged = True
    kept_at: Sequence[int] = range(len(values))
    rejected: list[tuple[int, Rejection]] = []  # (position in the chunk, rejection)
    if flagged:
        for i, (v, y, c) in enumerate(zip(values, labels, clean)):
            if y is not None and c is not None and v is not None and len(v) == expected <= spec.max_record_bytes:
                continue
            rec = chunk[i]
            try:
                _check_raw_size(rec.value, fmt, spec, expected)
                labels[i], clean[i] = _label(rec, fmt.label_from, spec), _clean_label(rec, spec)
            except RecordRejected as exc:
                rejected.append((i, Rejection(rec, exc.reason)))
        if rejected:
            bad = {i for i, _ in rejected}
            kept_at = [i for i in kept_at if i not in bad]
            values = [values[i] for i in kept_at]
            labels = [labels[i] for i in kept_at]
            clean = [clean[i] for i in kept_at]
        targets, clean_labels = np.array(labels, dtype=np.int64), np.array(clean, dtype=np.int64)
    m = len(values)
    x = np.frombuffer(b"".join(values), dtype=dtype).reshape(m, *spec.input_shape).astype(np.float32)
    if fmt.scale != 1.0:
        x *= np.float32(fmt.scale)
    if dtype.kind == "f":
        finite = np.isfinite(x.reshape(m, -1)).all(axis=1)
        if not finite.all():
            rejected += [(kept_at[j], Rejection(chunk[kept_at[j]], "features contain NaN or infinity"))
                         for j in np.flatnonzero(~finite).tolist()]
            rejected.sort(key=lambda r: r[0])  # fetch order, as decode_batch
            x, targets, clean_labels = x[finite], targets[finite], clean_labels[finite]
    # Through numpy: torch.tensor on a list of ints costs about three times as much.
    return DecodedBatch(inputs=torch.from_numpy(x), targets=torch.from_numpy(targets),
                        clean_labels=torch.from_numpy(clean_labels),
                        next_offsets={(chunk.topic, p): o for p, o in chunk.next_offsets().items()},
                        rejected=[r for _, r in rejected])


def _check_raw_size(value: bytes | None, fmt: RawFormat, spec: CodecSpec, expected: int) -> None:
    if value is None:
        raise RecordRejected("empty value (tombstone)")
    if len(value) > spec.max_record_bytes:
        raise RecordRejected(f"value of {len(value)} bytes exceeds max_record_bytes={spec.max_record_bytes}")
    if len(value) != expected:
        raise RecordRejected(f"raw value has {len(value)} bytes, expected {expected} "
                             f"({fmt.dtype} x {list(spec.input_shape)})")


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
    x = np.frombuffer(value, dtype=dtype).astype(np.float32).reshape(spec.input_shape)
    return x * np.float32(fmt.scale) if fmt.scale != 1.0 else x


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
