"""What arrives on Kafka and how a job says to read it: typed models at the source boundary."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

# A record's headers as a client library returns them; a header may have no value (None).
RawHeaders = Sequence[tuple[str, bytes | None]]


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


def normalise_headers(headers: RawHeaders | None) -> tuple[tuple[str, bytes], ...]:
    """Headers as KafkaRecord holds them: a tuple, a header without a value read as b""."""
    return tuple((k, v if v is not None else b"") for k, v in (headers or ()))


class RecordChunk(Sequence[KafkaRecord]):
    """Records of one topic in fetch order, held column by column: values, partitions, offsets,
    keys, headers and timestamps as parallel lists/arrays. The ingest path reads whole columns
    and does no Python work per record beyond what a column needs; the clients fill the columns
    and drop their own per-record objects at once (objects that stay alive per record make the
    garbage collector's full passes more frequent, a large cost at these rates).

    It is a Sequence of KafkaRecord for every other use. A KafkaRecord is built only for an
    element that is indexed or iterated, and at most once per chunk, so a chunk always yields the
    same object for a position: `rejection.record is r` checks between a batch and what was
    decoded from it hold. A chunk made from KafkaRecords yields those very objects, and so do
    its slices. Compares equal to any sequence of equal records (an empty chunk equals []).

    The ``timestamps`` column holds milliseconds, -1 where the client gave none.
    """

    __slots__ = ("_headers", "_keys", "_offsets", "_partitions", "_records", "_timestamps", "_values", "topic")

    def __init__(self, topic: str, values: list[bytes | None], partitions: np.ndarray | Sequence[int],
                 offsets: np.ndarray | Sequence[int], keys: list[bytes | None] | None = None,
                 headers: list[RawHeaders | None] | None = None, timestamps: list[int] | None = None, *,
                 records: list[KafkaRecord | None] | None = None) -> None:
        n = len(values)
        self.topic = topic
        self._values = values
        self._partitions = np.asarray(partitions, dtype=np.int64)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._keys = keys  # None: no record has a key
        self._headers = headers  # None: no record has headers
        self._timestamps = timestamps  # None: no record has a timestamp
        self._records = records
        if not len(self._partitions) == len(self._offsets) == n:
            raise ValueError("chunk columns differ in length")

    @classmethod
    def empty(cls, topic: str = "") -> RecordChunk:
        """A chunk without records."""
        return cls(topic, [], np.empty(0, np.int64), np.empty(0, np.int64))

    @classmethod
    def of_records(cls, records: Iterable[KafkaRecord]) -> RecordChunk | None:
        """A chunk yielding ``records`` themselves (a chunk is returned as it is); None if they
        span several topics."""
        if isinstance(records, RecordChunk):
            return records
        recs: list[KafkaRecord | None] = list(records)
        topics = {r.topic for r in recs}  # type: ignore[union-attr]
        if len(topics) > 1:
            return None
        rs: list[KafkaRecord] = recs  # type: ignore[assignment]
        return cls(topics.pop() if topics else "", [r.value for r in rs],
                   np.array([r.partition for r in rs], dtype=np.int64),
                   np.array([r.offset for r in rs], dtype=np.int64),
                   [r.key for r in rs], [r.headers for r in rs],
                   [-1 if r.timestamp_ms is None else r.timestamp_ms for r in rs], records=recs)

    @classmethod
    def concat(cls, chunks: Sequence[RecordChunk], topic: str = "") -> RecordChunk:
        """One chunk of ``chunks`` in order (list and array concatenation, no per-record work)."""
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return cls.empty(topic)
        if len({c.topic for c in chunks}) > 1:
            raise ValueError("chunks of different topics")
        n = [len(c) for c in chunks]

        def joined(cols: list[list[Any] | None], fill: Any) -> list[Any] | None:
            if all(col is None for col in cols):
                return None
            out: list[Any] = []
            for col, k in zip(cols, n):
                out += col if col is not None else [fill] * k  # list += list runs at C speed
            return out

        return cls(chunks[0].topic, joined([c._values for c in chunks], None),  # type: ignore[arg-type]
                   np.concatenate([c._partitions for c in chunks]), np.concatenate([c._offsets for c in chunks]),
                   joined([c._keys for c in chunks], None), joined([c._headers for c in chunks], None),
                   joined([c._timestamps for c in chunks], -1),
                   records=joined([c._records for c in chunks], None))

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> KafkaRecord: ...
    @overload
    def __getitem__(self, index: slice) -> RecordChunk: ...

    def __getitem__(self, index: int | slice) -> KafkaRecord | RecordChunk:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._values))
            if step != 1:
                return self.take(range(start, stop, step))

            def cut(col: list[Any] | None) -> list[Any] | None:
                return None if col is None else col[start:stop]

            return RecordChunk(self.topic, self._values[start:stop], self._partitions[start:stop],
                               self._offsets[start:stop], cut(self._keys), cut(self._headers),
                               cut(self._timestamps), records=cut(self._records))
        return self.record(index)

    def take(self, indices: Iterable[int]) -> RecordChunk:
        """A chunk of the records at ``indices``, in that order."""
        idx = list(indices)

        def pick(col: list[Any] | None) -> list[Any] | None:
            return None if col is None else [col[i] for i in idx]

        return RecordChunk(self.topic, [self._values[i] for i in idx], self._partitions[idx], self._offsets[idx],
                           pick(self._keys), pick(self._headers), pick(self._timestamps),
                           records=pick(self._records))

    def record(self, index: int) -> KafkaRecord:
        """The KafkaRecord at ``index``, built on first use and the same object afterwards."""
        n = len(self._values)
        if not -n <= index < n:
            raise IndexError(f"record index {index} out of range for a chunk of {n}")
        index %= n
        if self._records is None:
            self._records = [None] * n
        rec = self._records[index]
        if rec is None:
            ts = self._timestamps[index] if self._timestamps is not None else -1
            rec = self._records[index] = KafkaRecord(
                self.topic, int(self._partitions[index]), int(self._offsets[index]), self._values[index],
                self._keys[index] if self._keys is not None else None,
                normalise_headers(self._headers[index]) if self._headers is not None else (),
                ts if ts >= 0 else None)
        return rec

    def __iter__(self) -> Iterator[KafkaRecord]:
        return (self.record(i) for i in range(len(self._values)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # equality is by content

    def __repr__(self) -> str:
        return f"RecordChunk(topic={self.topic!r}, records={len(self)})"

    @property
    def partition_array(self) -> np.ndarray:
        """Partition of each record (int64)."""
        return self._partitions

    @property
    def offset_array(self) -> np.ndarray:
        """Offset of each record (int64)."""
        return self._offsets

    def values(self) -> list[bytes | None]:
        """Value of each record (None for a tombstone)."""
        return self._values

    def keys(self) -> list[bytes | None]:
        """Key of each record."""
        return self._keys if self._keys is not None else [None] * len(self._values)

    def timestamps(self) -> list[int | None]:
        """Timestamp (ms) of each record, None where the client gave none."""
        if self._timestamps is None:
            return [None] * len(self._values)
        return [t if t >= 0 else None for t in self._timestamps]

    def header_values(self, name: str, missing: Any = None) -> list[Any]:
        """Per record, the value of its last header called ``name`` (the header KafkaRecord.header
        returns), ``missing`` where it has none. A header without a value gives None here
        (KafkaRecord reads it as b"")."""
        return self.header_columns((name,), missing)[0]

    def header_columns(self, names: Sequence[str], missing: Any = None) -> list[list[Any]]:
        """:meth:`header_values` for several names, in one pass over the headers."""
        if self._headers is None:
            return [[missing] * len(self._values) for _ in names]
        # A plain scan beats building a dict per record (about 50 against 150 ns here).
        if len(names) == 2 and names[0] != names[1]:  # label and clean label: the ingest path's case, unrolled
            first, second = names
            out_a, out_b = [], []
            for headers in self._headers:
                a = b = missing
                for key, value in headers or ():
                    if key == first:
                        a = value  # keep scanning: the last of repeated names wins
                    elif key == second:
                        b = value
                out_a.append(a)
                out_b.append(b)
            return [out_a, out_b]
        cols: list[list[Any]] = [[] for _ in names]
        for headers in self._headers:
            found = dict.fromkeys(names, missing)
            for key, value in headers or ():
                if key in found:
                    found[key] = value
            for col, name in zip(cols, names):
                col.append(found[name])
        return cols

    def last_offsets(self) -> dict[int, int]:
        """Offset of the last record of each partition, in fetch order."""
        parts, offsets = self._partitions, self._offsets
        if not len(parts):
            return {}
        # Records of a partition come in runs; the last record of a partition ends its last run.
        ends = np.append(np.flatnonzero(parts[1:] != parts[:-1]), len(parts) - 1)
        return dict(zip(parts[ends].tolist(), offsets[ends].tolist()))

    def next_offsets(self) -> dict[int, int]:
        """Per partition, one past the largest offset in the chunk."""
        parts, offsets = self._partitions, self._offsets
        if not len(parts):
            return {}
        ends = np.append(np.flatnonzero(parts[1:] != parts[:-1]), len(parts) - 1)
        run_max = np.maximum.reduceat(offsets, np.concatenate(([0], ends[:-1] + 1)))
        out: dict[int, int] = {}
        for p, top in zip(parts[ends].tolist(), run_max.tolist()):
            out[p] = max(out.get(p, -1), top + 1)
        return out


class JsonValue(BaseModel):
    """The value of a ``json`` record: features, a class index or probability row, optional ids."""

    model_config = ConfigDict(extra="ignore")

    x: float | list  # nested lists of numbers; shape checked by the codec
    y: int | list[float]
    id: str | None = None


LabelSource = Literal["header", "key"]


class JsonFormat(BaseModel):
    """Value is JSON: {"x": number or nested list, "y": class index or probabilities, ...}."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["json"] = "json"


class RawFormat(BaseModel):
    """Value is a contiguous little-endian tensor; the label is in a header or the key."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["raw"] = "raw"
    dtype: Literal["float32", "float64", "float16", "uint8", "int8", "int16", "int32"] = Field(
        "float32", description="Element type of the value's tensor (little-endian).")
    label_from: LabelSource = Field("header", description="Where the class index is: a header or the key.")
    scale: float = Field(1.0, description="Features are multiplied by this, e.g. 1/255 (0.00392156862745098) "
                                          "for uint8 pixels, so networks see [0, 1].")


class ImageFormat(BaseModel):
    """Value is PNG or JPEG bytes (decoded with Pillow); the label is in a header or the key.
    Pixels are scaled to [0, 1], then normalised with ``mean``/``std`` per channel if given."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["image"] = "image"
    label_from: LabelSource = Field("header", description="Where the class index is: a header or the key.")
    mean: tuple[float, ...] | None = Field(None, description="Per-channel mean subtracted after scaling.")
    std: tuple[float, ...] | None = Field(None, description="Per-channel standard deviation divided by.")
    augment: bool = Field(False, description="Training batches get the standard augmentation: zero-pad 4, "
                                             "random crop, random horizontal flip (never the evaluation set).")


RecordFormat = Annotated[JsonFormat | RawFormat | ImageFormat, Field(discriminator="kind")]


class CodecSpec(BaseModel):
    """How one job turns records into tensors. ``input_shape`` is per example (e.g. [1, 28, 28])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: RecordFormat = Field(default_factory=JsonFormat)
    input_shape: tuple[PositiveInt, ...] = Field(description="Shape of one example's features.")
    num_classes: int = Field(ge=2, description="Labels are class indices in [0, num_classes).")
    max_record_bytes: PositiveInt = Field(1 << 20, description="Larger values are rejected.")
    label_header: str = Field("label", description="Header holding the class index (raw and image formats).")
    clean_label_header: str = Field("clean_label", description="Optional true label (synthetic noise).")
    source_field: str = Field(
        "source", min_length=1,
        description="Where a record names its source, for label quality per source: this key of a json value, "
                    "this header of a raw or image record. A record without one counts under \"unknown\".")
