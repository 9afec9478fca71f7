"""Ingest throughput: records/s per worker through KafkaSource + codec into ready tensors,
against a bare client poll loop on the same topic in the same run (ratio printed).

Formats: 784-byte raw (uint8 28x28), JSON (the same features), ~3 KB PNG images (32x32 RGB
noise). Backends: confluent-kafka and kafka-python. Starts the embedded broker itself.

    python bench/ingest.py                   # defaults below
    python bench/ingest.py --records 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import uuid

import numpy as np
from confluent_kafka import Producer

from workers.broker import EmbeddedBroker
from workers.codecs import decode_batch
from workers.kafka_clients import make_client
from workers.records import CodecSpec, ImageFormat, JsonFormat, RawFormat
from workers.source import KafkaSource, SourceSpec
from workers.topics import ensure_topic

PARTITIONS = 4


def make_values(fmt: str, n: int, rng: np.random.Generator) -> tuple[list[bytes], CodecSpec]:
    if fmt == "raw":
        x = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        return [row.tobytes() for row in x], CodecSpec(format=RawFormat(dtype="uint8"), input_shape=(1, 28, 28),
                                                       num_classes=10)
    if fmt == "json":
        x = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        return ([json.dumps({"x": row.tolist(), "y": int(i % 10)}).encode() for i, row in enumerate(x)],
                CodecSpec(format=JsonFormat(), input_shape=(1, 28, 28), num_classes=10))
    from PIL import Image

    # A few distinct ~3 KB PNGs, repeated: encoding is the producer's cost, not measured here.
    pngs = []
    for _ in range(16):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        img[:, 16:] = img[:, :16]  # some redundancy so PNG lands near 3 KB
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return [pngs[i % 16] for i in range(n)], CodecSpec(format=ImageFormat(), input_shape=(3, 32, 32), num_classes=10)


def fill(bootstrap: str, fmt: str, n: int) -> tuple[str, CodecSpec, int]:
    topic = f"ingest-{fmt}-{uuid.uuid4().hex[:6]}"
    ensure_topic(bootstrap, topic, PARTITIONS)
    values, codec = make_values(fmt, n, np.random.default_rng(0))
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, v in enumerate(values):
        while True:
            try:
                producer.produce(topic, value=v, partition=i % PARTITIONS, headers=[("label", str(i % 10).encode())])
                break
            except BufferError:
                producer.flush(1)
    producer.flush(60)
    return topic, codec, len(values[0])


def bare_loop(client_name: str, bootstrap: str, topic: str, n: int) -> float:
    """Records/s of the client's own poll loop: fetch every record, touch nothing."""
    client = make_client(client_name, bootstrap, f"bench-{uuid.uuid4().hex[:6]}", {})  # type: ignore[arg-type]
    client.assign(topic, {p: 0 for p in range(PARTITIONS)})
    got, start = 0, time.perf_counter()
    while got < n:
        got += len(client.poll(10_000, 0.5))
    elapsed = time.perf_counter() - start
    client.close()
    return n / elapsed


def source_and_codec(client_name: str, bootstrap: str, topic: str, codec: CodecSpec, n: int) -> float:
    """Records/s through KafkaSource (poller thread, bounded queue, batches) and decode_batch."""
    spec = SourceSpec(bootstrap_servers=bootstrap, topic=topic, client=client_name,  # type: ignore[arg-type]
                      batch_size=1024, queue_records=16384, fetch_records=10_000)
    got, start = 0, time.perf_counter()
    with KafkaSource(spec, group_id=f"bench-{uuid.uuid4().hex[:6]}") as source:
        while got < n:
            batch = decode_batch(source.next_batch() or [], codec)
            assert not batch.rejected
            got += len(batch)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000, help="records per topic (confluent)")
    p.add_argument("--kafka-python-records", type=int, default=20_000, help="records read with kafka-python")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{'format':>6} {'bytes':>6} {'client':>13} {'bare rec/s':>11} {'source+codec':>13} {'ratio':>6}")
    with EmbeddedBroker() as broker:
        for fmt in ("raw", "json", "image"):
            topic, codec, size = fill(broker.bootstrap, fmt, args.records)
            for client, n in (("confluent", args.records), ("kafka-python", min(args.kafka_python_records, args.records))):
                bare, ours = [], []
                for _ in range(args.repeats):  # interleaved, so drift hits both alike
                    bare.append(bare_loop(client, broker.bootstrap, topic, n))
                    ours.append(source_and_codec(client, broker.bootstrap, topic, codec, n))
                b, o = statistics.median(bare), statistics.median(ours)
                print(f"{fmt:>6} {size:>6} {client:>13} {b:>11.0f} {o:>13.0f} {o / b:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
