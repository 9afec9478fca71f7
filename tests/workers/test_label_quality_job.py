"""Label quality per source through the real broker and a real job (local Ray, 2 DDP workers),
across a resume."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.dead_letters import dlq_topic
from workers.kafka.topics import ensure_topic
from workers.report import JobReport
from workers.runner import run_job
from workers.spec import JobSpec
from workers.train.checkpoints import load_state

pytestmark = pytest.mark.slow

NOISE = {"clean-feed": 0.0, "crowd": 0.3, "scraped": 0.7}  # symmetric: a wrong label is any other class
PER_SOURCE, CLASSES, DIM = 1200, 5, 12


def _records(partitions: int) -> list[tuple[int, bytes, int]]:
    """PER_SOURCE records of each source, interleaved at random, as (partition, value, true
    label): Gaussian blobs of CLASSES classes, the given label flipped to another class at the
    source's rate."""
    rng = np.random.default_rng(7)
    names = np.repeat(list(NOISE), PER_SOURCE)
    rng.shuffle(names)
    centres = rng.normal(size=(CLASSES, DIM)) * 3
    out = []
    for i, name in enumerate(names.tolist()):
        y = int(rng.integers(CLASSES))
        x = centres[y] + rng.normal(size=DIM)
        given = (y + int(rng.integers(1, CLASSES))) % CLASSES if rng.random() < NOISE[name] else y
        out.append((i % partitions, json.dumps({"x": x.round(4).tolist(), "y": given, "source": name}).encode(), y))
    return out


def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes, int]]) -> None:
    """The records, with the true label in the clean-label header."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for partition, value, y in records:
        producer.produce(topic, partition=partition, headers=[("clean_label", str(y).encode())], value=value)
    producer.flush(30)


def test_noise_per_source_is_estimated_and_ranked(kafka_broker: EmbeddedBroker, local_ray: None,
                                                  tmp_path: Path) -> None:
    topic = f"sources-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    ensure_topic(kafka_broker.bootstrap, dlq_topic(topic), 1)
    records = _records(2)
    half = len(records) // 2
    _produce(kafka_broker.bootstrap, topic, records[:half])
    spec = JobSpec.model_validate({
        "job_id": "test-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": kafka_broker.bootstrap, "topic": topic, "stop_at": "end", "batch_size": 32},
        "codec": {"format": {"kind": "json"}, "input_shape": [DIM], "num_classes": CLASSES},
        "model": {"name": "mlp", "options": {"hidden": [32]}},
        "cicw": {"method": "cicw_m", "burn_in_steps": 5, "anneal_steps": 5},
        "scaling": {"num_workers": 2},
        "checkpoint": {"every_steps": 20, "storage_path": str(tmp_path / "ckpt")},
        "report_every_steps": 10,
    })
    # Half the stream, then the same job again once the rest has arrived: the second run resumes
    # from the first one's checkpoint, and the per-source totals carry over.
    first = run_job(spec)
    assert first.state == "finished" and first.error is None, first.error
    assert first.report is not None and first.report.examples == half
    assert sum(q.records for q in first.report.sources) == half
    _produce(kafka_broker.bootstrap, topic, records[half:])
    reports: list[JobReport] = []
    result = run_job(spec, on_report=reports.append)
    assert result.state == "finished" and result.error is None, result.error
    report = result.report
    assert report is not None and report.examples == PER_SOURCE * len(NOISE)

    by_name = {q.source: q for q in report.sources}
    assert set(by_name) == set(NOISE)  # every record named its source; none "unknown" or "other"
    assert sum(q.records for q in report.sources) == report.examples
    print(f"\nmodel error used for calibration: {report.label_model_error}")
    for name, rate in NOISE.items():
        q = by_name[name]
        print(f"source {name:10s} true {rate:.2f} measured {q.true_noise:.3f} estimated {q.estimated_noise:.3f} "
              f"disagreement {q.disagreement:.3f} mean N*w {q.mean_weight:.3f} "
              f"down-weighted {q.down_weighted_fraction:.3f}")
        assert q.estimated_noise is not None and q.true_noise is not None
        assert abs(q.estimated_noise - q.true_noise) <= 0.10, (name, q)
        # Without clean labels there is no calibration: the raw disagreement must do as well here.
        assert q.disagreement is not None and abs(q.disagreement - q.true_noise) <= 0.10, (name, q)
        assert abs(q.true_noise - rate) <= 0.05  # the stream is what it says (sampling error only)
    estimated = sorted(NOISE, key=lambda n: by_name[n].estimated_noise or 0.0)
    assert estimated == sorted(NOISE, key=NOISE.__getitem__)
    # The weights agree: the noisier a source, the lower its mean N*w.
    assert [by_name[n].mean_weight for n in estimated] == sorted((by_name[n].mean_weight for n in estimated),
                                                                  reverse=True)

    assert [c.label for c in report.classes] == list(range(CLASSES))
    for c in report.classes:
        print(f"class {c.label} true {c.true_noise:.3f} estimated {c.estimated_noise:.3f}")
        assert c.estimated_noise is not None and c.true_noise is not None
        assert abs(c.estimated_noise - c.true_noise) <= 0.10, c

    # The totals are in the last checkpoint, as both ranks merged them.
    labels = load_state(result.checkpoint).counters.labels
    assert {n: int(t.seen) for n, t in labels.sources.items()} == {n: PER_SOURCE for n in NOISE}
