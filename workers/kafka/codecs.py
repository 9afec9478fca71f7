"""Records to tensors. A record that cannot be decoded or validated is rejected with a reason,
never dropped silently: the caller routes rejections to the dead-letter topic.

One bad record never fails a batch: any exception while decoding a record (RecursionError from
deeply nested JSON, ValueError from an integer with thousands of digits, MemoryError, a Pillow
error) rejects that record alone, with a reason naming the exception. Images are checked against
the spec's size from their declared header before any pixel is decoded, so memory per record is
bounded by ``max_record_bytes`` and the spec's input shape.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from ..errors import RecordRejected
from .records import CodecSpec, ImageFormat, JsonFormat, JsonValue, KafkaRecord, RawFormat, RecordChunk


@dataclass(frozen=True)
class Rejection:
    """A record that cannot be trained on, and why (the dead letter's reason header)."""

    record: KafkaRecord
    reason: str


@dataclass
class DecodedBatch:
    """Tensors of the accepted records, in fetch order, and the offsets the batch consumed.

    inputs: [n, *input_shape] float32; targets: [n] int64, or [n, K] float32 if any record
    carried a probability row (index labels become one-hot then); clean_labels: [n] int64,
    -1 where a record had no clean-label header; sources: each row's source name (see
    :func:`source_name`; empty when the batch was built without them, read as all "unknown").
    ``next_offsets`` counts rejected records too: they are consumed (sent to the dead-letter
    topic), never read again.
    """

    inputs: Tensor
    targets: Tensor
    clean_labels: Tensor
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def decode_batch(records: Sequence[KafkaRecord], spec: CodecSpec) -> DecodedBatch:
    """Decode and validate ``records`` with ``spec``; invalid ones land in ``rejected``.

    ``records`` is a RecordChunk (what KafkaSource hands out) or any sequence of KafkaRecord.
    A rejection holds the very record object that ``records`` yields at its position. Every
    record ends up exactly once either as a row of the tensors or in ``rejected``: no exception
    raised while decoding one record escapes (KeyboardInterrupt and SystemExit do).
    """
    # Overflow to inf (float64 or scaled values) is a rejection, not a warning in the logs.
    with np.errstate(over="ignore", invalid="ignore"):
        if isinstance(spec.format, RawFormat):
            chunk = RecordChunk.of_records(records)
            if chunk is not None:
                return _decode_raw_chunk(chunk, spec.format, spec)
        return _decode_each(records, spec)


def _decode_each(records: Sequence[KafkaRecord], spec: CodecSpec) -> DecodedBatch:
    xs: list[np.ndarray] = []
    ys: list[int | np.ndarray] = []
    clean: list[int] = []
    sources: list[str] = []
    rejected: list[Rejection] = []
    next_offsets: dict[tuple[str, int], int] = {}
    for rec in records:
        tp = (rec.topic, rec.partition)
        next_offsets[tp] = max(next_offsets.get(tp, 0), rec.offset + 1)
        decoded = _decode_or_reject(rec, spec)
        if isinstance(decoded, Rejection):
            rejected.append(decoded)
            continue
        xs.append(decoded[0])
        ys.append(decoded[1])
        clean.append(decoded[2])
        sources.append(decoded[3])
    n = len(xs)
    inputs = torch.from_numpy(np.stack(xs)) if n else torch.zeros((0, *spec.input_shape))
    if any(isinstance(y, np.ndarray) for y in ys):
        rows = [y if isinstance(y, np.ndarray) else np.eye(spec.num_classes, dtype=np.float32)[y] for y in ys]
        targets = torch.from_numpy(np.stack(rows))
    else:
        targets = torch.tensor(ys, dtype=torch.int64)
    return DecodedBatch(inputs=inputs.float(), targets=targets,
                        clean_labels=torch.tensor(clean, dtype=torch.int64),
                        next_offsets=next_offsets, rejected=rejected, sources=sources)


def _decode_or_reject(rec: KafkaRecord, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray, int, str] | Rejection:
    """(features, label, clean label, source name) of one record, or its rejection."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            x, y, source = _decode_record(rec, spec)
        return x, y, _clean_label(rec, spec), source
    except Exception as exc:
        return Rejection(rec, rejection_reason(exc))


# Source names longer than this are cut: a label value of the service's metrics, not a payload.
SOURCE_NAME_CHARS = 100
UNKNOWN_SOURCE = "unknown"  # the source of a record that names none


def source_name(raw: str | bytes | None) -> str:
    """The source a record names (a json field's string or a header's bytes, UTF-8 with bad
    bytes replaced), cut to SOURCE_NAME_CHARS; "unknown" when absent or empty."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return raw[:SOURCE_NAME_CHARS] if raw else UNKNOWN_SOURCE


# Room for the exception's message in a reason (dead-letter headers, logs); the rest is cut.
_REASON_MESSAGE_CHARS = 200


def rejection_reason(exc: BaseException) -> str:
    """The reason a record is rejected for ``exc``: a RecordRejected's own reason, else the
    exception's type and its message (cut to 200 characters)."""
    if isinstance(exc, RecordRejected):
        return exc.reason
    message = str(exc)
    if len(message) > _REASON_MESSAGE_CHARS:
        message = message[:_REASON_MESSAGE_CHARS] + "..."
    return f"decoding raised {type(exc).__name__}: {message}" if message else f"decoding raised {type(exc).__name__}"


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
    dtype, expected = _raw_layout(fmt, spec)
    values = chunk.values()
    label_table, clean_table = _label_tables(spec.num_classes)
    if fmt.label_from == "header":
        raw_labels, raw_clean = chunk.header_columns((spec.label_header, spec.clean_label_header), _ABSENT)
    else:
        raw_labels, raw_clean = chunk.keys(), chunk.header_values(spec.clean_label_header, _ABSENT)
    raw_sources = chunk.header_values(spec.source_field)  # a pass of its own: keeps the two-name scan fast
    labels: list[int | None] = list(map(label_table.get, raw_labels))
    clean: list[int | None] = list(map(clean_table.get, raw_clean))
    try:  # the size checks of _value_problem, once per distinct length
        flagged = any(_size_problem(n, spec, expected) for n in set(map(len, values)))  # type: ignore[arg-type]
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
            if y is not None and c is not None and _value_problem(v, spec, expected) is None:
                continue
            rec = chunk[i]
            try:
                _check_value(rec.value, spec, expected)
                labels[i], clean[i] = _label(rec, fmt.label_from, spec), _clean_label(rec, spec)
            except Exception as exc:
                rejected.append((i, Rejection(rec, rejection_reason(exc))))
        if rejected:
            bad = {i for i, _ in rejected}
            kept_at = [i for i in kept_at if i not in bad]
            values = [values[i] for i in kept_at]
            labels = [labels[i] for i in kept_at]
            clean = [clean[i] for i in kept_at]
            raw_sources = [raw_sources[i] for i in kept_at]
        targets, clean_labels = np.array(labels, dtype=np.int64), np.array(clean, dtype=np.int64)
    m = len(values)
    joined = b"".join(values)  # type: ignore[arg-type]  # no tombstone is left
    x = np.frombuffer(joined, dtype=dtype).reshape(m, *spec.input_shape).astype(np.float32)
    if fmt.scale != 1.0:
        x *= np.float32(fmt.scale)
    if _may_be_non_finite(dtype, fmt.scale):
        finite = np.isfinite(x.reshape(m, math.prod(spec.input_shape))).all(axis=1)  # m may be 0
        if not finite.all():
            rejected += [(kept_at[j], Rejection(chunk[kept_at[j]], _NON_FINITE))
                         for j in np.flatnonzero(~finite).tolist()]
            rejected.sort(key=lambda r: r[0])  # fetch order, as decode_batch
            x, targets, clean_labels = x[finite], targets[finite], clean_labels[finite]
            raw_sources = [raw_sources[j] for j in np.flatnonzero(finite).tolist()]
    # Through numpy: torch.tensor on a list of ints costs about three times as much.
    return DecodedBatch(inputs=torch.from_numpy(x), targets=torch.from_numpy(targets),
                        clean_labels=torch.from_numpy(clean_labels),
                        next_offsets={(chunk.topic, p): o for p, o in chunk.next_offsets().items()},
                        rejected=[r for _, r in rejected], sources=list(map(source_name, raw_sources)))


_NON_FINITE = "features contain NaN or infinity"


def _raw_layout(fmt: RawFormat, spec: CodecSpec) -> tuple[np.dtype, int]:
    """The little-endian element type of a raw value and the exact byte count of one."""
    dtype = np.dtype(fmt.dtype).newbyteorder("<")
    return dtype, math.prod(spec.input_shape) * dtype.itemsize


@functools.lru_cache(maxsize=64)
def _may_be_non_finite(dtype: np.dtype, scale: float) -> bool:
    """Whether raw values of ``dtype`` times ``scale`` can be NaN or infinite in float32."""
    if dtype.kind == "f":
        return True
    info = np.iinfo(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return not bool(np.isfinite(np.float32(max(-int(info.min), int(info.max))) * np.float32(scale)))


# The value checks every format shares, written once: decode_record raises on them, the raw
# chunk path applies _size_problem to each distinct length and _value_problem to a flagged record.
def _size_problem(n: int, spec: CodecSpec, raw_bytes: int | None) -> str | None:
    """Why a value of ``n`` bytes is rejected (None if it is not): over ``max_record_bytes``, or
    not exactly ``raw_bytes`` long (raw format)."""
    if n > spec.max_record_bytes:
        return f"value of {n} bytes exceeds max_record_bytes={spec.max_record_bytes}"
    if raw_bytes is not None and n != raw_bytes:
        dtype = spec.format.dtype if isinstance(spec.format, RawFormat) else "?"
        return f"raw value has {n} bytes, expected {raw_bytes} ({dtype} x {list(spec.input_shape)})"
    return None


def _value_problem(value: bytes | None, spec: CodecSpec, raw_bytes: int | None) -> str | None:
    """Why ``value`` is rejected before it is decoded (a tombstone, or a size problem), or None."""
    if value is None:
        return "empty value (tombstone)"
    return _size_problem(len(value), spec, raw_bytes)


def _check_value(value: bytes | None, spec: CodecSpec, raw_bytes: int | None) -> bytes:
    """``value`` if it passes :func:`_value_problem`; else RecordRejected."""
    problem = _value_problem(value, spec, raw_bytes)
    if problem is not None:
        raise RecordRejected(problem)
    return value  # type: ignore[return-value]  # not None: no problem


def decode_record(rec: KafkaRecord, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray]:
    """One record's features (float32, ``spec.input_shape``) and label.

    Raises RecordRejected, whatever the record holds: any other exception its bytes provoke is
    turned into one, its reason naming that exception.
    """
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is rejected below, not warned
            x, y, _ = _decode_record(rec, spec)
            return x, y
    except RecordRejected:
        raise
    except Exception as exc:
        raise RecordRejected(rejection_reason(exc)) from exc


def _decode_record(rec: KafkaRecord, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray, str]:
    """(features, label, source name) of one record; raises as decode_record."""
    fmt = spec.format
    if isinstance(fmt, JsonFormat):
        x, y, source = _decode_json(_check_value(rec.value, spec, None), spec)
    elif isinstance(fmt, RawFormat):
        x = _raw_features(rec.value, fmt, spec)
        y = _label(rec, fmt.label_from, spec)
        source = source_name(rec.header(spec.source_field))
    else:
        x = _decode_image(_check_value(rec.value, spec, None), fmt, spec)
        y = _label(rec, fmt.label_from, spec)
        source = source_name(rec.header(spec.source_field))
    # Checked in the columnar path's order (size, label, clean label, then finite values), so a
    # record with several faults gets the same reason on either path.
    _clean_label(rec, spec)
    if not np.isfinite(x).all():
        raise RecordRejected(_NON_FINITE)
    return x, y, source


def decode_features(value: bytes | None, spec: CodecSpec) -> np.ndarray:
    """The features (float32, ``spec.input_shape``) of one record's value, without its label:
    what a model is given to predict on. Runs the checks :func:`decode_record` runs on a value
    (size, JSON fields and shape, image header and size, finite numbers); a json value may omit
    ``y`` and any ``y`` it has is ignored. Raw and image labels live in headers or the key, never
    in the value, so nothing is needed for them.

    Raises RecordRejected with the reason, whatever ``value`` holds (any other exception its bytes
    provoke is turned into one, as in :func:`decode_record`).
    """
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            x = _features(value, spec)
    except RecordRejected:
        raise
    except Exception as exc:
        raise RecordRejected(rejection_reason(exc)) from exc
    if not np.isfinite(x).all():
        raise RecordRejected(_NON_FINITE)
    return x


def _features(value: bytes | None, spec: CodecSpec) -> np.ndarray:
    fmt = spec.format
    if isinstance(fmt, JsonFormat):
        return _json_features(_parse_json(_check_value(value, spec, None), _JsonFeatures).x, spec)
    if isinstance(fmt, RawFormat):
        return _raw_features(value, fmt, spec)
    return _decode_image(_check_value(value, spec, None), fmt, spec)


def _raw_features(value: bytes | None, fmt: RawFormat, spec: CodecSpec) -> np.ndarray:
    dtype, expected = _raw_layout(fmt, spec)
    x = np.frombuffer(_check_value(value, spec, expected), dtype=dtype).astype(np.float32).reshape(spec.input_shape)
    return x * np.float32(fmt.scale) if fmt.scale != 1.0 else x


class _JsonFeatures(BaseModel):
    """A json value read for its features alone: ``y`` (and anything else) is ignored."""

    model_config = ConfigDict(extra="ignore")
    x: float | list


_Parsed = TypeVar("_Parsed", JsonValue, _JsonFeatures)


def _decode_json(value: bytes, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray, str]:
    document = _load_json(value)
    parsed = _parse_json(value, JsonValue, document)
    raw_source = document.get(spec.source_field) if isinstance(document, dict) else None
    if raw_source is not None and not isinstance(raw_source, str):
        raise RecordRejected(f"JSON value's source field {spec.source_field!r} is not a string")
    return _json_features(parsed.x, spec), _validate_label(parsed.y, spec), source_name(raw_source)


_NOT_LOADED = object()


def _load_json(value: bytes) -> object:
    """``value`` parsed as JSON, or _NOT_LOADED when it is not (:func:`_parse_json` says why)."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _NOT_LOADED


def _parse_json(value: bytes, model: type[_Parsed], document: object = _NOT_LOADED) -> _Parsed:
    """``value`` parsed as JSON (``document``, when the caller parsed it already) and validated
    as ``model``; RecordRejected naming what is wrong."""
    try:
        return model.model_validate(json.loads(value) if document is _NOT_LOADED else document)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordRejected(f"value is not JSON: {exc}") from exc
    except ValidationError as exc:  # before ValueError, its base class
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "value" for e in exc.errors())
        raise RecordRejected(f"JSON value has invalid field(s): {fields}") from exc
    except RecursionError as exc:  # the parser's depth is bounded by the interpreter's recursion limit
        raise RecordRejected("value is JSON nested too deeply to parse (RecursionError)") from exc
    except ValueError as exc:  # not a JSONDecodeError: an integer literal past int_max_str_digits
        raise RecordRejected(f"value is JSON this codec cannot read (ValueError: "
                             f"{str(exc)[:_REASON_MESSAGE_CHARS]})") from exc


def _json_features(raw_x: float | list, spec: CodecSpec) -> np.ndarray:
    """A json value's ``x`` as float32 of ``spec.input_shape``; RecordRejected if it is not."""
    try:
        x = np.asarray(raw_x)  # no dtype: numpy would parse strings such as "nan" as floats
    except (ValueError, TypeError) as exc:
        raise RecordRejected(f"x is not a rectangular array of numbers: {exc}") from exc
    if x.dtype.kind not in "iuf":
        raise RecordRejected(f"x is not a rectangular array of numbers (found {x.dtype.name} values)")
    x = x.astype(np.float32)
    if x.size != math.prod(spec.input_shape):
        raise RecordRejected(f"x has shape {list(x.shape)}, expected {list(spec.input_shape)}")
    return x.reshape(spec.input_shape)


def _decode_image(value: bytes, fmt: ImageFormat, spec: CodecSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if len(spec.input_shape) != 3 or spec.input_shape[0] not in (1, 3):
        raise RecordRejected(f"image format needs input_shape [C, H, W] with C in (1, 3), got {list(spec.input_shape)}")
    c, h, w = spec.input_shape
    kind, value, declared = _image_header(value)
    # Checked before Pillow sees the file: a small file may declare a huge image (8000x8000 PNG
    # of 62 KB), and only the spec's size is ever decoded. Pillow's own decompression-bomb limit
    # (Image.MAX_IMAGE_PIXELS, process-wide) is left alone: no image past this check exceeds it.
    if declared != (w, h):
        raise RecordRejected(f"image is {declared[0]}x{declared[1]}, expected {w}x{h}")
    try:
        with Image.open(io.BytesIO(value), formats=[kind]) as img:
            if img.format != kind:  # e.g. a JPEG that Pillow reads as MPO
                raise RecordRejected(f"image format {img.format} is not PNG or JPEG")
            if img.size != (w, h):  # Pillow read another size than the header scan: decode nothing
                raise RecordRejected(f"image is {img.size[0]}x{img.size[1]}, expected {w}x{h}")
            arr = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.float32)
    except RecordRejected:
        raise
    except UnidentifiedImageError as exc:  # its message names the BytesIO object: not worth a header
        raise RecordRejected(f"value is not a decodable image: Pillow cannot read it as {kind}") from exc
    except Exception as exc:
        raise RecordRejected(f"value is not a decodable image: {rejection_reason(exc)}") from exc
    x = (arr.reshape(h, w, c).transpose(2, 0, 1) / 255.0).astype(np.float32)
    if fmt.mean is not None and fmt.std is not None:
        x = (x - np.asarray(fmt.mean, np.float32).reshape(-1, 1, 1)) / np.asarray(fmt.std, np.float32).reshape(-1, 1, 1)
    return x


def _image_header(value: bytes) -> tuple[str, bytes, tuple[int, int]]:
    """(Pillow format name, the bytes to give Pillow, declared (width, height)) of a PNG or JPEG
    value, read from its header alone. Raises RecordRejected for anything else."""
    if value.startswith(_PNG_SIGNATURE):
        return ("PNG", *_png_essentials(value))
    if value.startswith(b"\xff\xd8"):
        return "JPEG", value, _jpeg_size(value)
    raise RecordRejected(f"value is not a decodable image: not PNG or JPEG (starts with {value[:8]!r})")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that define a PNG's pixels as Pillow decodes them; every other chunk is dropped unread,
# so text chunks (zTXt/iTXt inflate up to Pillow's 1 MB a chunk and 64 MB a file), ICC profiles
# and animation chunks cost nothing.
_PNG_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})


def _png_essentials(value: bytes) -> tuple[bytes, tuple[int, int]]:
    """The PNG with only its pixel chunks (``value`` itself when it has no other), and the
    (width, height) its IHDR chunk declares."""
    spans: list[tuple[int, int]] = []
    dropped = False
    size: tuple[int, int] | None = None
    pos = len(_PNG_SIGNATURE)
    while pos < len(value):
        if pos + 12 > len(value):
            raise RecordRejected(f"value is not a decodable image: PNG chunk at byte {pos} is truncated")
        length, kind = struct.unpack_from(">I4s", value, pos)
        end = pos + 12 + length  # length, type, data, CRC
        if end > len(value):
            raise RecordRejected(f"value is not a decodable image: PNG chunk {kind!r} at byte {pos} is truncated")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise RecordRejected("value is not a decodable image: PNG does not start with an IHDR chunk")
            size = struct.unpack_from(">II", value, pos + 8)
        if kind in _PNG_PIXEL_CHUNKS:
            spans.append((pos, end))
        else:
            dropped = True
        pos = end
        if kind == b"IEND":
            break
    if size is None:
        raise RecordRejected("value is not a decodable image: PNG has no IHDR chunk")
    if dropped:
        value = b"".join([_PNG_SIGNATURE, *(value[a:b] for a, b in spans)])
    return value, size


# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not.
_JPEG_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(value: bytes) -> tuple[int, int]:
    """The (width, height) of a JPEG's last frame header before its first scan, as Pillow reads
    it (Pillow too skips bytes between segments that are not a marker)."""
    size: tuple[int, int] | None = None
    pos, n = 2, len(value)
    while pos + 1 < n:
        if value[pos] != 0xFF:
            pos += 1
            continue
        marker = value[pos + 1]
        if marker == 0xFF or marker == 0x00:  # fill byte, or an escaped 0xFF
            pos += 1 if marker == 0xFF else 2
            continue
        pos += 2
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker == 0xD9:
            raise RecordRejected("value is not a decodable image: JPEG ends before its first scan")
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a segment
            continue
        if pos + 2 > n:
            break
        length = struct.unpack_from(">H", value, pos)[0]
        if marker in _JPEG_FRAME_MARKERS:
            if pos + 7 > n:
                break
            height, width = struct.unpack_from(">HH", value, pos + 3)
            size = (width, height)
        pos += max(length, 2)
    if size is None:
        raise RecordRejected("value is not a decodable image: JPEG has no frame header (SOF) before its first scan")
    return size


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
