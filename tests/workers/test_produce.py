"""cicw-stream produce: readers, noise with clean labels kept, rate limiting, and a round trip
through the real broker, the source and the codec."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from service.cli import main as cli_main
from workers.data.produce import ProduceSpec, _read_csv, produce
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.codecs import decode_batch
from workers.kafka.records import CodecSpec, RawFormat
from workers.kafka.source import KafkaSource, SourceSpec


class ListProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        self.sent.append((topic, value or b"", headers or []))

    def flush(self, timeout: float = 0) -> int:
        return 0


def _npz(tmp_path: Path, n: int = 200, k: int = 3) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8), y=np.arange(n) % k)
    return path


def test_csv_reader_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("f1,label,f2\n1.5,2,3\n4,0,5.5\n")
    x, y = _read_csv(tmp_path / "a.csv")
    assert x.tolist() == [[1.5, 3.0], [4.0, 5.5]] and y.tolist() == [2, 0]
    (tmp_path / "b.csv").write_text("1,2,1\n3,4,0\n")
    x, y = _read_csv(tmp_path / "b.csv")
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [1, 0]


def test_rate_limit_uses_the_injected_clock(tmp_path: Path) -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    spec = ProduceSpec(bootstrap_servers="unused:1", topic="t", dataset="npz", path=str(_npz(tmp_path, n=50)),
                       records_per_s=100.0, format="json")
    out = ListProducer()
    report = produce(spec, out, clock=lambda: now[0], sleep=sleep)
    assert report.records == 50 and len(out.sent) == 50
    assert sum(sleeps) == pytest.approx(49 / 100.0)
    assert b'"y": 0' in out.sent[0][1]


def test_cli_rejects_bad_arguments_naming_the_field(capsys) -> None:  # type: ignore[no-untyped-def]
    code = cli_main(["produce", "--bootstrap-servers", "x:1", "--topic", "t", "--dataset", "npz", "--rate", "2"])
    assert code == 2 and "--rate" in capsys.readouterr().err
    code = cli_main(["produce", "--bootstrap-servers", "x:1", "--topic", "t", "--dataset", "mnist"])
    assert code == 2 and "--dataset" in capsys.readouterr().err


def test_produce_then_consume_through_the_broker(kafka_broker: EmbeddedBroker, tmp_path: Path) -> None:
    topic = f"prod-{uuid.uuid4().hex[:10]}"
    code = cli_main(["produce", "--bootstrap-servers", kafka_broker.bootstrap, "--topic", topic,
                     "--dataset", "npz", "--path", str(_npz(tmp_path)), "--noise", "symmetric",
                     "--rate", "0.5", "--passes", "2", "--partitions", "3"])
    assert code == 0
    spec = SourceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, stop_at="end", batch_size=500)
    codec = CodecSpec(format=RawFormat(dtype="uint8"), input_shape=(1, 4, 4), num_classes=3)
    with KafkaSource(spec) as source:
        records = []
        while (batch := source.next_batch()) is not None:
            records += batch
    decoded = decode_batch(records, codec)
    assert len(decoded) == 400 and not decoded.rejected
    assert decoded.next_offsets == {(topic, p): 134 if p < 1 else 133 for p in range(3)}  # round-robin
    clean = decoded.clean_labels
    assert sorted(clean.tolist()) == sorted((np.arange(200) % 3).tolist() * 2)
    corrupted = float((decoded.targets != clean).float().mean())
    assert 0.35 < corrupted < 0.65  # symmetric noise at rate 0.5, 200 draws repeated twice
    assert (decoded.inputs >= 0).all() and decoded.inputs.max() <= 255
