"""Ingest throughput: records/s per worker through KafkaSource + codec into ready tensors,
against a bare client poll loop on the same topic in the same run (ratio printed).

Formats: 784-byte raw (uint8 28x28, label in a header), JSON (the same features), ~3 KB PNG
images (32x32 RGB noise). Backends: confluent-kafka and kafka-python. Starts the embedded
broker itself.

What is timed, for both loops alike: from an assigned consumer (the bare loop) or a started
source (ours: metadata and start offsets read, poller running) until ``--records`` records are
in hand, ours decoded into float32 tensors. The topic holds more records than either loop reads,
so neither waits at the end of the data (a bare consume(10000) would wait out its timeout for
the last partial call, and the source its max_wait_s for the last partial batch). The source
runs with SourceSpec's defaults but batch_size=1024. The bare loop calls the client library
directly and touches nothing; for confluent-kafka it is timed at two consume() sizes, the
10,000 of the project's platform notes and the 256 our client uses per call, and the ratio is
printed against each. A full garbage collection runs before each loop's consumer is created.

    python bench/ingest.py                   # defaults below
    python bench/ingest.py --records 100000 --repeats 3 --formats raw
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import numpy as np
from confluent_kafka import Producer

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.clients import CONFLUENT_DEFAULTS, CONSUME_BATCH
from workers.kafka.codecs import decode_batch
from workers.kafka.producing import produce_waiting
from workers.kafka.records import CodecSpec, ImageFormat, JsonFormat, RawFormat
from workers.kafka.source import KafkaSource, SourceSpec
from workers.kafka.topics import ensure_topic

PARTITIONS = 4
BATCH = 1024
# Records in the topic beyond what any loop reads (the bare loop over-reads by < 10,000).
SLACK = 20_000


def make_values(fmt: str, n: int, rng: np.random.Generator) -> tuple[list[bytes], CodecSpec]:
    """``n`` record values of format ``fmt`` and the codec that reads them."""
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
    """A new topic holding ``n`` records of ``fmt``, round-robin over the partitions."""
    topic = f"ingest-{fmt}-{uuid.uuid4().hex[:6]}"
    ensure_topic(bootstrap, topic, PARTITIONS)
    values, codec = make_values(fmt, n, np.random.default_rng(0))
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, v in enumerate(values):
        produce_waiting(producer, topic, value=v, partition=i % PARTITIONS, headers=[("label", str(i % 10).encode())])
    producer.flush(60)
    return topic, codec, len(values[0])


def bare_confluent(bootstrap: str, topic: str, n: int, per_call: int) -> float:
    """Records/s of confluent-kafka's own consume loop (same consumer settings as our client)."""
    from confluent_kafka import Consumer, TopicPartition

    gc.collect()  # before the consumer exists: librdkafka would prefetch during it
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                         **CONFLUENT_DEFAULTS})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    got, start = 0, time.perf_counter()
    while got < n:
        got += len(consumer.consume(num_messages=per_call, timeout=0.5))
    elapsed = time.perf_counter() - start
    consumer.close()
    return got / elapsed


def bare_kafka_python(bootstrap: str, topic: str, n: int) -> float:
    """Records/s of kafka-python's own poll loop."""
    from kafka import KafkaConsumer, TopicPartition

    gc.collect()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex[:6]}",
                             enable_auto_commit=False, auto_offset_reset="earliest")
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    got, start = 0, time.perf_counter()
    while got < n:
        got += sum(len(rs) for rs in consumer.poll(timeout_ms=500, max_records=10_000).values())
    elapsed = time.perf_counter() - start
    consumer.close()
    return got / elapsed


def source_and_codec(client_name: str, bootstrap: str, topic: str, codec: CodecSpec, n: int) -> tuple[float, float]:
    """Records/s through KafkaSource (poller thread, bounded queue, batches) and decode_batch,
    and the seconds start() took (not in the rate)."""
    spec = SourceSpec(bootstrap_servers=bootstrap, topic=topic, client=client_name,  # type: ignore[arg-type]
                      batch_size=BATCH)
    source = KafkaSource(spec, group_id=f"bench-{uuid.uuid4().hex[:6]}")
    gc.collect()
    t0 = time.perf_counter()
    source.start()
    got, start = 0, time.perf_counter()
    try:
        while got < n:
            batch = decode_batch(source.next_batch() or [], codec)
            assert not batch.rejected
            got += len(batch)
        elapsed = time.perf_counter() - start
    finally:
        source.close()
    return got / elapsed, start - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=300_000, help="raw records read per loop (confluent)")
    p.add_argument("--slow-records", type=int, default=50_000, help="json and image records read per loop (confluent)")
    p.add_argument("--kafka-python-records", type=int, default=20_000, help="records read per loop with kafka-python")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--formats", default="raw,json,image")
    args = p.parse_args(argv)
    print(f"{'format':>6} {'bytes':>6} {'client':>13} {'bare loop':>22} {'bare rec/s':>11} "
          f"{'source+codec':>13} {'ratio':>6} {'start ms':>9}", flush=True)
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap
        for fmt in args.formats.split(","):
            n = args.records if fmt == "raw" else args.slow_records
            topic, codec, size = fill(bs, fmt, max(n, args.kafka_python_records) + SLACK)
            for client in ("confluent", "kafka-python"):
                m = n if client == "confluent" else args.kafka_python_records
                bares: dict[str, Callable[[], float]] = (
                    {f"consume({per_call})": (lambda k=per_call, t=topic, m=m: bare_confluent(bs, t, m, k))  # type: ignore[misc]
                     for per_call in (10_000, CONSUME_BATCH)}
                    if client == "confluent"
                    else {"poll(max_records=10000)": lambda t=topic, m=m: bare_kafka_python(bs, t, m)})  # type: ignore[misc]
                bare: dict[str, list[float]] = {k: [] for k in bares}
                ours: list[float] = []
                starts: list[float] = []
                for _ in range(args.repeats):  # interleaved, so drift hits all loops alike
                    for name, loop in bares.items():
                        bare[name].append(loop())
                    rate, started = source_and_codec(client, bs, topic, codec, m)
                    ours.append(rate)
                    starts.append(started)
                o, s = statistics.median(ours), statistics.median(starts) * 1e3
                for name, rates in bare.items():
                    b = statistics.median(rates)
                    print(f"{fmt:>6} {size:>6} {client:>13} {name:>22} {b:>11.0f} {o:>13.0f} {o / b:>6.2f} {s:>9.0f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
