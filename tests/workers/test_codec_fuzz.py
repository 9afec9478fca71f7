"""One bad record never stops a job: for every format, decode_batch over arbitrary bytes, keys and
headers never raises, and accounts for every record exactly once, as a tensor row or as a
rejection of that very record object, agreeing record by record with decode_record. A catalogue
of known-hostile inputs (deep nesting, giant integers, NaN literals, decompression bombs, text
chunks that inflate, truncated files, odd image modes, bad labels) is rejected with a reason
naming the problem, and the bombs decode in memory bounded by the spec, not by what they claim."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from workers.errors import RecordRejected
from workers.kafka.codecs import DecodedBatch, _clean_label, decode_batch, decode_record
from workers.kafka.records import CodecSpec, ImageFormat, JsonFormat, KafkaRecord, RawFormat, RecordChunk

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_SPEC = CodecSpec(format=JsonFormat(), input_shape=(2, 2), num_classes=3)
IMAGE_SPECS = [CodecSpec(format=ImageFormat(), input_shape=(3, 8, 8), num_classes=4, max_record_bytes=1 << 20),
               CodecSpec(format=ImageFormat(label_from="key"), input_shape=(1, 8, 8), num_classes=4)]


# -- what every batch must satisfy ---------------------------------------------------------------

def _expected(rec: KafkaRecord, spec: CodecSpec) -> tuple[np.ndarray, int | np.ndarray, int] | str:
    """What decode_record and the clean-label check make of one record: a row, or a reason."""
    try:
        x, y = decode_record(rec, spec)
        return x, y, _clean_label(rec, spec)
    except RecordRejected as exc:
        return exc.reason


def assert_every_record_accounted_once(records: Sequence[KafkaRecord], batch: DecodedBatch,
                                       spec: CodecSpec) -> None:
    """Each record is a row or a rejection (of that object), exactly once, in fetch order, and
    rows and rejections are those the per-record checks give."""
    recs = list(records)  # a chunk yields the same object for a position every time
    position = {id(r): i for i, r in enumerate(recs)}
    rejected_at = [position[id(r.record)] for r in batch.rejected]  # KeyError: not one of the records
    assert rejected_at == sorted(set(rejected_at)), "a record rejected twice, or out of fetch order"
    assert all(r.record is recs[i] for r, i in zip(batch.rejected, rejected_at))
    assert len(batch) + len(batch.rejected) == len(recs)
    assert all(isinstance(r.reason, str) and r.reason for r in batch.rejected)
    n = len(batch)
    assert batch.inputs.shape == (n, *spec.input_shape) and batch.inputs.dtype == torch.float32
    assert bool(torch.isfinite(batch.inputs).all())
    assert batch.targets.shape[0] == n and batch.clean_labels.shape == (n,)
    parts: dict[tuple[str, int], int] = {}
    for r in recs:
        parts[(r.topic, r.partition)] = max(parts.get((r.topic, r.partition), 0), r.offset + 1)
    assert batch.next_offsets == parts

    expected = [_expected(r, spec) for r in recs]
    assert [i for i, e in enumerate(expected) if isinstance(e, str)] == rejected_at
    assert [r.reason for r in batch.rejected] == [e for e in expected if isinstance(e, str)]
    rows = [e for e in expected if not isinstance(e, str)]
    if rows:
        torch.testing.assert_close(batch.inputs, torch.from_numpy(np.stack([x for x, _, _ in rows])))
        assert batch.clean_labels.tolist() == [c for _, _, c in rows]
        if batch.targets.dim() == 1:
            assert batch.targets.tolist() == [y for _, y, _ in rows]
        else:
            eye = np.eye(spec.num_classes, dtype=np.float32)
            want = np.stack([y if isinstance(y, np.ndarray) else eye[y] for _, y, _ in rows])
            torch.testing.assert_close(batch.targets, torch.from_numpy(want))


# -- strategies ------------------------------------------------------------------------------------

LABEL_SPELLINGS = [b"0", b"1", b"3", b"07", b" 2", b"-1", b"4", b"99", b"", b"x", b"\xff", b"1" * 5000,
                   "\u0663".encode(), b"1_0", b"nan"]
header_value = st.one_of(st.sampled_from(LABEL_SPELLINGS), st.binary(max_size=12))
headers = st.lists(st.tuples(st.sampled_from(["label", "clean_label", "trace"]), header_value), max_size=4)
keys = st.one_of(st.none(), st.sampled_from(LABEL_SPELLINGS), st.binary(max_size=8))


def records_of(values: st.SearchStrategy[bytes | None], topic: str = "t") -> st.SearchStrategy[list[KafkaRecord]]:
    """Lists of records on 3 partitions with increasing offsets, arbitrary keys and headers."""
    one = st.tuples(values, keys, headers, st.integers(0, 2))
    return st.lists(one, max_size=12).map(lambda rows: [
        KafkaRecord(topic, p, 100 + i, v, key=k, headers=tuple(h)) for i, (v, k, h, p) in enumerate(rows)])


json_numbers = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                         st.integers(min_value=-(10 ** 40), max_value=10 ** 40))
json_trees = st.recursive(st.one_of(st.none(), st.booleans(), json_numbers, st.text(max_size=5)),
                          lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                 st.dictionaries(st.sampled_from(["x", "y", "id", "z"]), kids,
                                                                 max_size=4)), max_leaves=20)
near_valid_json = st.fixed_dictionaries(
    {"x": st.one_of(st.lists(st.lists(json_numbers, min_size=2, max_size=2), min_size=2, max_size=2),
                    st.lists(json_numbers, min_size=3, max_size=5), json_trees),
     "y": st.one_of(st.integers(-1, 4), st.lists(st.floats(-0.5, 1.5), min_size=2, max_size=4), json_trees)},
    optional={"id": st.one_of(st.text(max_size=5), json_trees)})
json_values = st.one_of(
    st.none(), st.binary(max_size=64),
    near_valid_json.map(lambda d: json.dumps(d).encode()),
    json_trees.map(lambda t: json.dumps(t).encode()),
    st.tuples(near_valid_json, st.integers(0, 200)).map(lambda t: json.dumps(t[0]).encode()[:t[1]]))


@FUZZ
@given(records_of(json_values))
def test_json_decode_accounts_for_arbitrary_records(records: list[KafkaRecord]) -> None:
    assert_every_record_accounted_once(records, decode_batch(records, JSON_SPEC), JSON_SPEC)


RAW_DTYPES = ["float32", "float64", "float16", "uint8", "int8", "int16", "int32"]


@st.composite
def raw_case(draw: st.DrawFn) -> tuple[CodecSpec, list[KafkaRecord], RecordChunk]:
    dtype = draw(st.sampled_from(RAW_DTYPES))
    fmt = RawFormat(dtype=dtype, label_from=draw(st.sampled_from(["header", "key"])),  # type: ignore[arg-type]
                    scale=draw(st.sampled_from([1.0, 1 / 255, 1e30])))
    size = 3 * np.dtype(dtype).itemsize
    spec = CodecSpec(format=fmt, input_shape=(3,), num_classes=5,
                     max_record_bytes=draw(st.sampled_from([1 << 20, size, size - 1])))
    values = st.one_of(st.none(), st.binary(min_size=size, max_size=size), st.binary(max_size=2 * size + 1))
    rows = draw(st.lists(st.tuples(values, keys, st.lists(st.tuples(
        st.sampled_from(["label", "clean_label", "trace"]), st.one_of(st.none(), header_value)), max_size=4),
        st.integers(0, 2)), max_size=12))
    # As a client builds a chunk (a header may lack a value), and the records it then yields.
    chunk = RecordChunk("t", [v for v, _, _, _ in rows], [p for *_, p in rows], list(range(len(rows))),
                        [k for _, k, _, _ in rows], [tuple(h) or None for _, _, h, _ in rows])
    return spec, list(chunk), chunk


@FUZZ
@given(raw_case())
def test_raw_decode_accounts_for_arbitrary_records_on_both_paths(case: tuple[CodecSpec, list[KafkaRecord],
                                                                             RecordChunk]) -> None:
    spec, records, chunk = case
    assert_every_record_accounted_once(chunk, decode_batch(chunk, spec), spec)  # the columnar path
    # Records of several topics take the per-record path: the same answers, record by record.
    other = [KafkaRecord("u", 0, 0, b"\x00" * 3 * np.dtype(spec.format.dtype).itemsize,  # type: ignore[union-attr]
                         key=b"1", headers=(("label", b"1"),))]
    assert_every_record_accounted_once(records + other, decode_batch(records + other, spec), spec)


def _encode(size: tuple[int, int], mode: str, kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=kind)
    return buf.getvalue()


@st.composite
def image_value(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["PNG", "JPEG"]))
    modes = ["L", "RGB", "RGBA", "P", "1", "I;16", "LA"] if kind == "PNG" else ["L", "RGB", "CMYK"]
    size = draw(st.one_of(st.just((8, 8)), st.tuples(st.integers(1, 12), st.integers(1, 12))))
    value = bytearray(_encode(size, draw(st.sampled_from(modes)), kind, draw(st.integers(0, 3))))
    for pos, byte in draw(st.lists(st.tuples(st.integers(0, len(value) - 1), st.integers(0, 255)), max_size=3)):
        value[pos] = byte
    if draw(st.booleans()):
        value = value[:draw(st.integers(0, len(value)))]
    if kind == "PNG" and draw(st.booleans()):  # an arbitrary chunk after IHDR
        kind_of_chunk = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"acTL", b"IDAT", b"abCd"]))
        data = draw(st.binary(max_size=40))
        value[33:33] = _png_chunk(kind_of_chunk, data)
    return draw(st.one_of(st.just(bytes(value)), st.none(), st.binary(max_size=40),
                          st.binary(max_size=40).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                          st.binary(max_size=40).map(lambda b: b"\xff\xd8" + b)))


@FUZZ
@given(st.sampled_from(IMAGE_SPECS), records_of(image_value()))
def test_image_decode_accounts_for_arbitrary_records(spec: CodecSpec, records: list[KafkaRecord]) -> None:
    batch = _decode_traced(records, spec)
    assert_every_record_accounted_once(records, batch, spec)


# -- the catalogue of known-hostile records ----------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels: 8 KB for 8000x8000,
    which Pillow would decode to 192 MB of RGB and the codec to 768 MB of float32."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def _png_with_text(inflated: int, chunks: int) -> bytes:
    """A valid 8x8 PNG carrying ``chunks`` zTXt chunks that each inflate to ``inflated`` bytes."""
    png = _encode((8, 8), "RGB", "PNG", 0)
    text = _png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * inflated, 9))
    return png[:33] + text * chunks + png[33:]


def _jpeg_declaring(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose frame header is patched to claim ``width`` x ``height``."""
    jpeg = bytearray(_encode((8, 8), "RGB", "JPEG", 0))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def _deep(levels: int) -> bytes:
    return b'{"x": ' + b"[" * levels + b"1" + b"]" * levels + b', "y": 0}'


GOOD_JSON = json.dumps({"x": [[1, 2], [3, 4]], "y": 1}).encode()
JSON_CATALOGUE = {
    "nested 5000 levels": (_deep(5000), "nested too deeply"),
    "nested 50 levels": (_deep(50), "x has shape"),
    "nested 100 levels (past numpy's 64 dimensions)": (_deep(100), "rectangular array"),
    "nested in an ignored field": (b'{"x": [1, 2, 3, 4], "y": 0, "z": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                   "nested too deeply"),
    "bare nesting": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "10,000-digit int in x": (b'{"x": [' + b"9" * 10_000 + b', 1, 2, 3], "y": 0}', "digits"),
    "10,000-digit int as label": (b'{"x": [1, 2, 3, 4], "y": ' + b"9" * 10_000 + b"}", "digits"),
    "40-digit int in x": (b'{"x": [' + b"9" * 40 + b', 1, 2, 3], "y": 0}', "rectangular array"),
    "NaN literal": (b'{"x": [NaN, 1, 2, 3], "y": 0}', "NaN or infinity"),
    "Infinity literal": (b'{"x": [Infinity, 1, 2, 3], "y": 0}', "NaN or infinity"),
    "-Infinity as a label row entry": (b'{"x": [1, 2, 3, 4], "y": [-Infinity, 0.5, 0.5]}', "probability"),
    "float overflowing float32": (b'{"x": [1e300, 1, 2, 3], "y": 0}', "NaN or infinity"),
    "float overflowing float64": (b'{"x": [1e400, 1, 2, 3], "y": 0}', "NaN or infinity"),
    "huge string as x": (b'{"x": "' + b"a" * 500_000 + b'", "y": 0}', "invalid field(s): x"),
    "numeric string as x": (b'{"x": "nan", "y": 0}', "x has shape"),
    "over max_record_bytes": (b'{"x": [1, 2, 3, 4], "y": 0, "id": "' + b"a" * (1 << 20) + b'"}', "max_record_bytes"),
    "label row not summing to 1": (b'{"x": [1, 2, 3, 4], "y": [0.5, 0.6, 0.1]}', "probability"),
    "label row with a negative entry": (b'{"x": [1, 2, 3, 4], "y": [1.5, -0.5, 0.0]}', "probability"),
    "label row of the wrong length": (b'{"x": [1, 2, 3, 4], "y": [0.5, 0.5]}', "entries"),
    "label row nested": (b'{"x": [1, 2, 3, 4], "y": [[1.0], [0], [0]]}', "invalid field(s): y"),
    "ragged x": (b'{"x": [[1, 2], [3]], "y": 0}', "rectangular array"),
    "x an object": (b'{"x": {"a": 1}, "y": 0}', "invalid field(s): x"),
    "top-level list": (b"[1, 2, 3, 4]", "invalid field(s)"),
    "not UTF-8": (b"\xff\xfe\xfd", "not JSON"),
    "not JSON": (b"{x: 1}", "not JSON"),
    "empty": (b"", "not JSON"),
    "tombstone": (None, "tombstone"),
}


@pytest.mark.parametrize("name", list(JSON_CATALOGUE))
def test_hostile_json_record_is_rejected_alone(name: str) -> None:
    value, why = JSON_CATALOGUE[name]
    records = [KafkaRecord("t", 0, 0, GOOD_JSON), KafkaRecord("t", 0, 1, value), KafkaRecord("t", 1, 0, GOOD_JSON)]
    batch = decode_batch(records, JSON_SPEC)
    assert len(batch) == 2 and [r.record for r in batch.rejected] == [records[1]]
    assert batch.rejected[0].record is records[1]
    assert why in batch.rejected[0].reason, batch.rejected[0].reason
    assert len(batch.rejected[0].reason) < 400
    assert_every_record_accounted_once(records, batch, JSON_SPEC)


RAW_SPEC = CodecSpec(format=RawFormat(dtype="float32"), input_shape=(2,), num_classes=3)
RAW_GOOD = np.array([1.0, 2.0], "<f4").tobytes()
RAW_CATALOGUE: dict[str, tuple[bytes | None, list[tuple[str, bytes]], str]] = {
    "tombstone": (None, [("label", b"1")], "tombstone"),
    "short value": (RAW_GOOD[:-1], [("label", b"1")], "expected 8"),
    "NaN feature": (np.array([np.nan, 1], "<f4").tobytes(), [("label", b"1")], "NaN or infinity"),
    "no label": (RAW_GOOD, [], "no label"),
    "10,000-digit label": (RAW_GOOD, [("label", b"9" * 10_000)], "not an integer"),
    "non-ASCII label": (RAW_GOOD, [("label", b"\xff1")], "not an integer"),
    "negative label": (RAW_GOOD, [("label", b"-1")], "out of range"),
    "10,000-digit clean label": (RAW_GOOD, [("label", b"1"), ("clean_label", b"9" * 10_000)], "clean label"),
    "clean label out of range": (RAW_GOOD, [("label", b"1"), ("clean_label", b"3")], "clean label"),
}


@pytest.mark.parametrize("name", list(RAW_CATALOGUE))
def test_hostile_raw_record_is_rejected_alone(name: str) -> None:
    value, hdrs, why = RAW_CATALOGUE[name]
    records = [KafkaRecord("t", 0, 0, RAW_GOOD, headers=(("label", b"0"),)),
               KafkaRecord("t", 0, 1, value, headers=tuple(hdrs)),
               KafkaRecord("t", 0, 2, RAW_GOOD, headers=(("label", b"2"),))]
    batch = decode_batch(records, RAW_SPEC)
    assert batch.targets.tolist() == [0, 2] and len(batch.rejected) == 1
    assert batch.rejected[0].record is records[1] and why in batch.rejected[0].reason, batch.rejected[0].reason
    assert_every_record_accounted_once(records, batch, RAW_SPEC)


def _decode_traced(records: Sequence[KafkaRecord], spec: CodecSpec) -> DecodedBatch:
    """decode_batch, asserting its peak traced memory is bounded by the spec and the input, not
    by the sizes the records claim: 16 float32 copies of every image plus 8 copies of the
    bytes. (tracemalloc sees Python and numpy allocations; Pillow's own image buffers are not
    traced, but every decoded image becomes a traced numpy array.)"""
    bound = 16 * 4 * int(np.prod(spec.input_shape)) * max(len(records), 1) + \
        8 * sum(len(r.value or b"") for r in records) + (2 << 20)
    tracemalloc.start()
    try:
        batch = decode_batch(records, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound, f"decoding took {peak} bytes at its peak, more than {bound}"
    return batch


IMAGE_CATALOGUE = {
    "8000x8000 PNG of a few KB": (lambda: _png_declaring(8000, 8000), "8000x8000, expected 8x8"),
    "1x1 PNG": (lambda: _png_declaring(1, 1), "1x1, expected 8x8"),
    "PNG claiming 2^31 x 2^31": (lambda: _png_declaring(1, 1)[:16] + struct.pack(">II", 1 << 31, 1 << 31)
                                 + _png_declaring(1, 1)[24:], "2147483648x2147483648"),
    "zTXt inflating past Pillow's 1 MB chunk limit": (lambda: _png_with_text(4 << 20, 1), None),
    "60 zTXt chunks of 1 MB each (Pillow's 64 MB text limit)": (lambda: _png_with_text(1000_000, 60), None),
    "PNG truncated mid-IDAT": (lambda: _encode((8, 8), "RGB", "PNG", 0)[:50], "truncated"),
    "PNG without IHDR": (lambda: b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IEND", b""), "IHDR"),
    "JPEG claiming 8000x8000": (lambda: _jpeg_declaring(8000, 8000), "8000x8000, expected 8x8"),
    "JPEG claiming 65535x65535 (past Pillow's bomb error)": (lambda: _jpeg_declaring(65535, 65535), "65535x65535"),
    "JPEG truncated in its scan": (lambda: _encode((8, 8), "RGB", "JPEG", 0)[:-60], "not a decodable image"),
    "JPEG without a frame header": (lambda: b"\xff\xd8\xff\xda\x00\x02" + b"\x00" * 20, "no frame header"),
    "GIF": (lambda: _encode((8, 8), "P", "GIF", 0), "not PNG or JPEG"),
    "BMP": (lambda: _encode((8, 8), "RGB", "BMP", 0), "not PNG or JPEG"),
    "tombstone": (lambda: None, "tombstone"),
}


@pytest.mark.parametrize("name", list(IMAGE_CATALOGUE))
def test_hostile_image_record_is_rejected_alone_in_bounded_memory(name: str) -> None:
    make, why = IMAGE_CATALOGUE[name]
    spec = IMAGE_SPECS[0]
    good = _encode((8, 8), "RGB", "PNG", 1)
    records = [KafkaRecord("t", 0, 0, good, headers=(("label", b"1"),)),
               KafkaRecord("t", 0, 1, make(), headers=(("label", b"2"),)),
               KafkaRecord("t", 0, 2, good, headers=(("label", b"3"),))]
    batch = _decode_traced(records, spec)
    assert_every_record_accounted_once(records, batch, spec)
    if why is None:  # text chunks are never read: the pixels decode as if they were not there
        assert batch.targets.tolist() == [1, 2, 3] and not batch.rejected
    else:
        assert batch.targets.tolist() == [1, 3] and batch.rejected[0].record is records[1]
        assert why in batch.rejected[0].reason, batch.rejected[0].reason


@pytest.mark.parametrize("mode,kind", [("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("LA", "PNG"),
                                       ("L", "JPEG"), ("CMYK", "JPEG")])
@pytest.mark.parametrize("spec", IMAGE_SPECS, ids=["rgb", "gray"])
def test_images_of_other_modes_decode_to_the_spec_channels(mode: str, kind: str, spec: CodecSpec) -> None:
    records = [KafkaRecord("t", 0, 0, _encode((8, 8), mode, kind, 2), key=b"1", headers=(("label", b"1"),))]
    batch = decode_batch(records, spec)
    assert len(batch) == 1 and batch.inputs.shape == (1, *spec.input_shape)
    assert_every_record_accounted_once(records, batch, spec)
