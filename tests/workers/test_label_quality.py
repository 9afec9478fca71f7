"""Label quality per source and class: the accumulator, its merge over ranks, its bound on
sources, its checkpoint form, the calibrated estimator, and the codec's source names."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from workers.errors import CheckpointError
from workers.kafka.codecs import decode_batch, source_name
from workers.kafka.records import CodecSpec, KafkaRecord, RecordChunk
from workers.train.label_quality import OTHER_SOURCE, TALLY_FIELDS, LabelQuality, LabelWindow, Tally
from workers.train.metrics import NoiseTotals
from workers.train.state import Counters

K = 3


def _observe(window: LabelWindow, sources: list[str], given: list[int], clean: list[int],
             predicted: list[int] | None, nw: list[float], *, active: bool = True) -> None:
    """One step of ``window``: N = len(rows) (one rank), weights nw / N."""
    n = len(given)
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), K).float() if predicted is not None else None
    window.observe(sources=sources, targets=torch.tensor(given), clean_labels=torch.tensor(clean), logits=logits,
                   weights=torch.tensor(nw, dtype=torch.float32) / n, global_examples=n, weights_active=active)


def test_a_window_counts_each_source_and_class_after_burn_in_only() -> None:
    w = LabelWindow(num_classes=K, max_sources=5)
    _observe(w, ["a", "b"], [0, 1], [0, 2], [0, 0], [1.0, 1.0], active=False)  # burn-in: seen only
    _observe(w, ["a", "a", "b", "b"], [0, 1, 2, 2], [0, 0, 2, -1], [0, 0, 1, 2], [1.6, 0.2, 2.0, 0.2])
    a, b = w.sources["a"], w.sources["b"]
    assert (a.seen, a.weighed, a.down, a.scored, a.disagree, a.known, a.noisy, a.checked, a.mistaken) == (
        3, 2, 1, 2, 1, 2, 1, 2, 0)
    assert a.weight_sum == pytest.approx(1.8)
    # b: given 2/2, clean 2/unknown, predicted 1/2: one disagreement, one known clean label
    # (right), which the model got wrong.
    assert (b.seen, b.weighed, b.down, b.disagree, b.known, b.noisy, b.checked, b.mistaken) == (3, 2, 1, 1, 1, 0, 1, 1)
    assert [c.seen for c in w.classes] == [2, 2, 2] and w.classes[1].noisy == 1


def test_rows_without_source_names_count_as_unknown_and_probability_rows_have_no_disagreement() -> None:
    w = LabelWindow(num_classes=K, max_sources=5)
    w.observe(sources=[], targets=torch.tensor([[0.5, 0.5, 0.0]] * 2), clean_labels=torch.tensor([0, 1]),
              logits=torch.zeros(2, K), weights=torch.tensor([0.5, 0.5]), global_examples=2, weights_active=True)
    (name, tally), = w.sources.items()
    assert name == "unknown" and (tally.seen, tally.weighed, tally.scored, tally.known) == (2, 2, 0, 0)
    assert all(c.seen == 0 for c in w.classes)  # no given class


def test_sources_past_max_sources_fold_into_other_keeping_every_count() -> None:
    totals = LabelQuality()
    window = LabelWindow(num_classes=K, max_sources=2)
    for name, count in (("big", 5), ("mid", 3), ("small", 2), ("tiny", 1)):
        _observe(window, [name] * count, [0] * count, [1] * count, [0] * count, [1.0] * count)
    totals.merge([window.as_rows()], max_sources=2)
    assert {n: t.seen for n, t in totals.sources.items()} == {"big": 5, "mid": 3, OTHER_SOURCE: 3}
    assert totals.sources[OTHER_SOURCE].noisy == 3  # counts are moved, not dropped
    # A source that grows past the kept ones takes a place; the smallest kept one is folded.
    later = LabelWindow(num_classes=K, max_sources=2)
    _observe(later, ["new"] * 6, [0] * 6, [0] * 6, [0] * 6, [1.0] * 6)
    totals.merge([later.as_rows()], max_sources=2)
    assert {n: t.seen for n, t in totals.sources.items()} == {"new": 6, "big": 5, OTHER_SOURCE: 6}
    assert sum(t.seen for t in totals.sources.values()) == 17
    report = totals.report(K)
    assert [q.source for q in report["sources"]] == ["new", OTHER_SOURCE, "big"]  # most records first


def test_a_rank_window_is_bounded_too() -> None:
    w = LabelWindow(num_classes=K, max_sources=1)  # keeps up to 4 names between reports
    _observe(w, [f"s{i}" for i in range(10)], [0] * 10, [0] * 10, [0] * 10, [1.0] * 10)
    assert len(w.sources) == 5 and w.sources[OTHER_SOURCE].seen == 6


def test_windows_of_several_ranks_merge_by_name_as_one_rank_would_count() -> None:
    rows: list[tuple[str, int, int, int, float]] = [  # source, given, clean, predicted, N*w
        ("a", 0, 0, 0, 1.5), ("b", 1, 2, 2, 0.1), ("a", 2, 1, 1, 0.2), ("c", 1, 1, 1, 1.2),
        ("b", 0, 0, 1, 0.9), ("c", 2, 2, 2, 2.1)]
    one = LabelWindow(num_classes=K, max_sources=10)
    _observe(one, *map(list, zip(*[(s, g, c, p) for s, g, c, p, _ in rows])), [r[4] for r in rows])  # type: ignore[arg-type]
    ranks = [LabelWindow(num_classes=K, max_sources=10) for _ in range(2)]
    for window, part in zip(ranks, (rows[:4], rows[4:])):  # rank 1 never sees "a"
        # each rank's share of a global batch of 6: N*w uses the global N
        n = len(rows)
        window.observe(sources=[r[0] for r in part], targets=torch.tensor([r[1] for r in part]),
                       clean_labels=torch.tensor([r[2] for r in part]),
                       logits=torch.nn.functional.one_hot(torch.tensor([r[3] for r in part]), K).float(),
                       weights=torch.tensor([r[4] / n for r in part]), global_examples=n, weights_active=True)
    merged, single = LabelQuality(), LabelQuality()
    merged.merge([w.as_rows() for w in ranks], max_sources=10)
    single.merge([one.as_rows()], max_sources=10)
    assert set(merged.sources) == {"a", "b", "c"}
    for name in single.sources:
        assert merged.sources[name].row() == pytest.approx(single.sources[name].row())
    for mine, theirs in zip(merged.classes, single.classes, strict=True):
        assert mine.row() == pytest.approx(theirs.row())
    both = [q.report(K)["sources"] for q in (merged, single)]
    assert [q.source for q in both[0]] == [q.source for q in both[1]]
    assert [q.estimated_noise for q in both[0]] == [q.estimated_noise for q in both[1]]


@pytest.mark.parametrize(("rho", "accuracy"), [(0.0, 0.9), (0.3, 0.9), (0.7, 0.85), (0.3, 1.0)])
def test_the_estimate_corrects_the_disagreement_for_the_model_error(rho: float, accuracy: float) -> None:
    """Simulated: symmetric noise at rho, a model right with probability ``accuracy`` and wrong
    to any other class alike. The raw disagreement is off by the model's error; the estimate is not."""
    rng = np.random.default_rng(1)
    n, k = 200_000, 5
    true = rng.integers(k, size=n)
    given = np.where(rng.random(n) < rho, (true + rng.integers(1, k, size=n)) % k, true)
    predicted = np.where(rng.random(n) < accuracy, true, (true + rng.integers(1, k, size=n)) % k)
    t = Tally(scored=n, disagree=float((predicted != given).sum()))
    e = float((predicted != true).mean())
    estimate = t.estimated_noise(e, k)
    assert estimate is not None and abs(estimate - rho) < 0.01
    # What the correction is for: the raw disagreement is off by e * (1 - rho * K / (K - 1)).
    assert t.disagreement() == pytest.approx(rho + e * (1 - rho * k / (k - 1)), abs=0.01)


def test_the_model_error_comes_from_clean_labels_then_the_evaluation_then_nothing() -> None:
    q = LabelQuality()
    assert q.model_error() is None and q.model_error(0.8) == pytest.approx(0.2)
    q.sources["a"] = Tally(checked=10, mistaken=1)
    q.sources["b"] = Tally(checked=30, mistaken=3)
    assert q.model_error(0.5) == pytest.approx(0.1)
    assert Tally().estimated_noise(0.1, K) is None
    assert Tally(scored=10, disagree=9).estimated_noise(0.9, K) == 0.9  # a model at chance: uncorrected


def test_label_quality_round_trips_through_a_checkpoint_payload() -> None:
    w = LabelWindow(num_classes=K, max_sources=5)
    _observe(w, ["a", "b", "a"], [0, 1, 2], [0, 2, 2], [0, 1, 1], [1.5, 0.1, 1.4])
    counters = Counters(step=1, examples=3, noise=NoiseTotals(down=1, corrupted=1, hit=1))
    counters.labels.merge([w.as_rows()], max_sources=5)
    buffer = io.BytesIO()
    torch.save(counters.as_payload(), buffer)
    buffer.seek(0)
    back = Counters.from_payload(torch.load(buffer, weights_only=True))
    assert back == counters
    assert back.labels.report(K) == counters.labels.report(K)


def test_a_checkpoint_without_label_quality_restores_empty_totals() -> None:
    old = {"step": 4, "examples": 128, "rejected": 0, "noise_down": 0, "noise_corrupted": 0, "noise_hit": 0}
    back = Counters.from_payload(old)
    assert back.labels == LabelQuality() and back.labels.report(K) == {"sources": [], "classes": [],
                                                                        "label_model_error": None}


@pytest.mark.parametrize(("label_quality", "message"), [
    ([], "must be"),
    ({"sources": {"a": [1.0] * 3}, "classes": []}, "source 'a'"),
    ({"sources": {"a": [-1.0] * len(TALLY_FIELDS)}, "classes": []}, "non-negative"),
    ({"sources": {}, "classes": [[math.inf, "x"]]}, "class 0"),
    ({"sources": {7: [0.0] * len(TALLY_FIELDS)}, "classes": []}, "not a string"),
])
def test_malformed_label_quality_in_a_checkpoint_is_refused(label_quality: Any, message: str) -> None:
    payload = {**Counters().as_payload(), "label_quality": label_quality}
    with pytest.raises(CheckpointError, match=message):
        Counters.from_payload(payload)


# -- the codec's source names --------------------------------------------------------------------


def _json(i: int, **extra: Any) -> KafkaRecord:
    return KafkaRecord("t", 0, i, json.dumps({"x": [1.0, 2.0], "y": 1, **extra}).encode())


def test_json_records_name_their_source_in_the_configured_field() -> None:
    spec = CodecSpec(input_shape=(2,), num_classes=K)
    batch = decode_batch([_json(0, source="feed-a"), _json(1), _json(2, source=""), _json(3, source="x" * 300)], spec)
    assert batch.sources == ["feed-a", "unknown", "unknown", "x" * 100]
    other = CodecSpec(input_shape=(2,), num_classes=K, source_field="origin")
    assert decode_batch([_json(0, origin="o", source="s")], other).sources == ["o"]
    bad = decode_batch([_json(0, source=5), _json(1, source="ok")], spec)
    assert bad.sources == ["ok"] and [r.reason for r in bad.rejected] == [
        "JSON value's source field 'source' is not a string"]


@pytest.mark.parametrize("as_chunk", [True, False])
def test_raw_records_name_their_source_in_a_header(as_chunk: bool) -> None:
    spec = CodecSpec.model_validate({"format": {"kind": "raw"}, "input_shape": [2], "num_classes": K,
                                     "source_field": "src"})
    good = np.array([1, 2], "<f4").tobytes()
    nan = np.array([np.nan, 2], "<f4").tobytes()
    recs = [KafkaRecord("t", 0, 0, good, headers=(("label", b"1"), ("src", "caf\xe9".encode()))),
            KafkaRecord("t", 0, 1, nan, headers=(("label", b"1"), ("src", b"dropped"))),
            KafkaRecord("t", 0, 2, good, headers=(("label", b"0"), ("src", b"\xff"))),
            KafkaRecord("t" if as_chunk else "u", 0, 3, good, headers=(("label", b"2"),))]
    # One topic: the columnar path; two topics: record by record.
    records: Any = RecordChunk.of_records(recs) if as_chunk else recs
    assert (records is not None) and (RecordChunk.of_records(recs) is None) != as_chunk
    batch = decode_batch(records, spec)
    assert len(batch) == 3 and batch.sources == ["caf\xe9", "\ufffd", "unknown"]


def test_source_names() -> None:
    assert source_name(None) == source_name(b"") == source_name("") == "unknown"
    assert source_name(b"a\xffb") == "a\ufffdb"
