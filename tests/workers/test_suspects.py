"""Suspect labels, unit by unit: the threshold, the headers, when publishing starts, the counts
and their checkpoint payload, and the checkpoint's wait for suspect records (fakes only; the
real broker and job are in test_suspects_job.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.errors import CheckpointError
from workers.kafka.codecs import decode_batch
from workers.kafka.dead_letters import DeadLetterSink
from workers.kafka.records import CodecSpec, KafkaRecord
from workers.spec import SuspectsSpec
from workers.train import suspects as s
from workers.train.decisions import DeadLetterStatus, first_refusal
from workers.train.state import Counters


class _Producer:
    """Records what is produced; flush delivers (or refuses) everything and leaves ``hold_back``."""

    def __init__(self, *, refuse: bool = False, hold_back: int = 0) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.refuse, self.hold_back = refuse, hold_back
        self._callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Any = None) -> None:
        self.sent.append((topic, value, key, list(headers or [])))
        self._callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        for callback in self._callbacks:
            callback("Broker: Topic authorization failed" if self.refuse else None, None)
        self._callbacks = []
        return self.hold_back


def test_suspects_are_the_rows_strictly_below_the_threshold_with_the_models_view() -> None:
    # N = 4 global examples; this rank holds 3 rows with N*w = 0.04, 0.4, 0.1 (0.1 is not below 0.1).
    weights = torch.tensor([0.01, 0.1, 0.025])
    logits = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    found = s.select_suspects(targets=torch.tensor([0, 0, 2]), logits=logits, weights=weights, global_examples=4,
                              max_weight=0.1)
    assert [x.row for x in found] == [0]
    only = found[0]
    assert (only.label, only.predicted) == (0, 1)
    assert only.weight == pytest.approx(0.04)
    assert only.probability == pytest.approx(torch.softmax(logits[0], 0)[1].item())
    wider = s.select_suspects(targets=torch.tensor([0, 0, 2]), logits=None, weights=weights, global_examples=4,
                              max_weight=0.25)
    assert [(x.row, x.predicted, x.probability) for x in wider] == [(0, None, None), (2, None, None)]
    # Probability rows: the given label is the row's most likely class.
    rows = s.select_suspects(targets=torch.tensor([[0.1, 0.9], [1.0, 0.0]]), logits=None,
                             weights=torch.tensor([0.0, 0.5]), global_examples=2, max_weight=0.5)
    assert [(x.row, x.label) for x in rows] == [(0, 1)]


def test_headers_say_label_prediction_weight_step_and_where_from_before_the_records_own() -> None:
    record = KafkaRecord("train", 3, 41, b"{}", key=b"k", headers=(("clean_label", b"2"),))
    headers = s.suspect_headers(record, s.Suspect(row=0, label=1, weight=0.0625, predicted=2, probability=0.875),
                                step=17, source="crowd")
    assert headers == [(s.LABEL_HEADER, b"1"), (s.PREDICTED_HEADER, b"2"), (s.PROBABILITY_HEADER, b"0.875"),
                       (s.WEIGHT_HEADER, b"0.0625"), (s.STEP_HEADER, b"17"), (s.TOPIC_HEADER, b"train"),
                       (s.PARTITION_HEADER, b"3"), (s.OFFSET_HEADER, b"41"), (s.SOURCE_HEADER, b"crowd"),
                       ("clean_label", b"2")]
    unforwarded = dict(s.suspect_headers(record, s.Suspect(0, 1, 0.0, None, None), step=1, source="unknown"))
    assert s.PREDICTED_HEADER not in unforwarded and s.PROBABILITY_HEADER not in unforwarded


def _step_inputs() -> tuple[list[KafkaRecord], Any]:
    """Four records of which the second is rejected: rows are records 0, 2, 3 (clean labels 1, 0, 2)."""
    values = [b'{"x": [1, 2], "y": 0, "source": "a"}', b"garbage", b'{"x": [3, 4], "y": 0, "source": "b"}',
              b'{"x": [5, 6], "y": 2}']
    records = [KafkaRecord("train", 0, 10 + i, v, headers=(("clean_label", str(c).encode()),))
               for i, (v, c) in enumerate(zip(values, [1, 1, 0, 2], strict=True))]
    batch = decode_batch(records, CodecSpec(input_shape=(2,), num_classes=3, source_field="source"))
    assert len(batch) == 3 and len(batch.rejected) == 1
    return records, batch


def test_nothing_is_published_during_burn_in_and_after_steps_then_the_low_weights_are() -> None:
    records, batch = _step_inputs()
    producer = _Producer()
    publisher = s.SuspectPublisher(SuspectsSpec(max_weight=0.25, after_steps=2), source_topic="train",
                                   burn_in_steps=5, producer=producer)
    assert publisher.topic == "train.suspects"
    # N = 6 over two ranks: N*w = 0.06, 1.2, 0.12 for this rank's rows.
    weights, logits = torch.tensor([0.01, 0.2, 0.02]), torch.tensor([[0.0, 3.0, 0.0]] * 3)

    def step(n: int, active: bool = True) -> int:
        return publisher.observe(step=n, records=records, batch=batch, targets=batch.targets, logits=logits,
                                 weights=weights, global_examples=6, weights_active=active)

    assert step(6, active=False) == 0  # still in burn-in (the loss's schedule says so)
    assert step(6) == step(7) == 0  # burn-in ended at step 5; after_steps=2 more are skipped
    assert producer.sent == [] and publisher.take_window() == [0, 0, 0, 0]
    assert step(8) == 2
    assert [(t, v, dict(h)[s.OFFSET_HEADER], dict(h)[s.SOURCE_HEADER]) for t, v, _, h in producer.sent] == [
        ("train.suspects", records[0].value, b"10", b"a"), ("train.suspects", records[3].value, b"13", b"unknown")]
    # Published 2, both with a clean label, one of them wrong (record 10: given 0, clean 1); the
    # step's wrong labels: record 10 and record 12 (given 0, clean 0 - right): one.
    assert publisher.take_window() == [2, 2, 1, 1]
    assert publisher.take_window() == [0, 0, 0, 0]


def test_a_checkpoint_waits_for_suspect_records_as_for_dead_letters() -> None:
    dead = DeadLetterSink(_Producer())
    held = s.SuspectPublisher(SuspectsSpec(), source_topic="t", burn_in_steps=0, producer=_Producer(hold_back=1))
    held.sink.produce("t.suspects", b"v", None, [])
    status = DeadLetterStatus.after_flush([dead, held.sink], 0.1)
    assert status.refused is None and status.pending is not None and "suspect record" in status.pending

    refusing = s.SuspectPublisher(SuspectsSpec(), source_topic="t", burn_in_steps=0, producer=_Producer(refuse=True))
    refusing.sink.produce("t.suspects", b"v", None, [])
    assert first_refusal([dead, refusing.sink]) is None  # no delivery report yet
    refusing.sink._producer.flush()  # the report arrives (librdkafka serves it in a poll)
    assert first_refusal([dead, refusing.sink]) == "Broker: Topic authorization failed"
    status = DeadLetterStatus.after_flush([dead, refusing.sink], 0.1)
    assert status.refused is not None and "1 suspect record(s) refused" in status.refused


def test_totals_report_precision_and_recall_and_round_trip_in_checkpoints() -> None:
    totals = s.SuspectTotals()
    assert totals.report() == {"suspects_published": 0, "suspects_precision": None, "suspects_recall": None}
    totals.add([10.0, 8.0, 6.0, 12.0])
    totals.add([2.0, 2.0, 2.0, 3.0])
    assert totals.report() == {"suspects_published": 12, "suspects_precision": 0.8, "suspects_recall": 8 / 15}
    counters = Counters(step=3, suspects=totals)
    assert Counters.from_payload(counters.as_payload()).suspects == totals
    old = counters.as_payload()
    del old["suspects"]  # a checkpoint written before suspects were kept
    assert Counters.from_payload(old).suspects == s.SuspectTotals()
    for bad in ([1, 2, 3], [1, 2, 3, -1], [1, 2, 3, 4.0], [1, 2, 3, 2], [1, 2, 1, 1]):
        with pytest.raises(CheckpointError, match="checkpoint suspects"):
            Counters.from_payload({**old, "suspects": bad})


def test_the_spec_defaults_the_topic_and_bounds_the_threshold() -> None:
    assert SuspectsSpec().topic_for("train") == "train.suspects"
    assert SuspectsSpec(topic="review").topic_for("train") == "review"
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="max_weight"):
            SuspectsSpec(max_weight=bad)
