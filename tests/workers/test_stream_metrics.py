"""What reports carry: MetricWindow (prequential accuracy, loss, rate and noise detection from step
outputs), the step-time histogram, the per-partition lag summed over ranks, and the report
fields' validation."""

from __future__ import annotations

import math
from itertools import accumulate

import pytest
import torch
from pydantic import ValidationError

from workers.report import STEP_SECONDS_EDGES, CICWStepStats, JobReport
from workers.train.metrics import MetricWindow, NoiseTotals, StepTimes, lag_from_vector, lag_vector


def test_window_sums_and_summary() -> None:
    now = [10.0]
    w = MetricWindow(clock=lambda: now[0])
    targets = torch.tensor([0, 1, 2, 1])
    clean = torch.tensor([0, 2, 2, -1])  # record 1 was corrupted; record 3's truth is unknown
    logits = torch.eye(3)[[0, 1, 0, 1]] * 5  # predicts 0, 1, 0, 1: three of four right
    weights = torch.tensor([0.4, 0.01, 0.4, 0.19])  # record 1 down-weighted (n*w = 0.04 < 1/4)
    w.observe(loss=torch.tensor(2.0), targets=targets, clean_labels=clean, logits=logits, weights=weights,
              global_examples=4, weights_active=True)
    w.observe(loss=torch.tensor(1.0), targets=targets, clean_labels=clean, logits=None, weights=weights,
              global_examples=4, weights_active=False)  # mixup burn-in: no logits, weights not used
    assert w.sums() == [3.0, 4.0, 3.0, 1.0, 1.0, 1.0] and w.steps == 2 and w.examples == 8
    now[0] = 12.0
    totals = NoiseTotals(down=1, corrupted=3, hit=1)  # from earlier in the job
    # As if a second rank had the same sums: the caller passes the all-reduced values.
    global_sums = [2 * v for v in w.sums()]
    totals.add(global_sums)
    assert totals == NoiseTotals(down=3, corrupted=5, hit=3)
    m = w.summary(global_sums, totals)
    assert m["records_per_s"] == 4.0 and m["loss"] == 3.0 and m["prequential_accuracy"] == 0.75
    assert m["noise_precision"] == 1.0 and m["noise_recall"] == 0.6


def test_probability_targets_count_loss_only_and_empty_window_is_nan() -> None:
    w = MetricWindow()
    soft = torch.full((2, 3), 1 / 3)
    w.observe(loss=torch.tensor(0.5), targets=soft, clean_labels=torch.tensor([-1, -1]), logits=torch.zeros(2, 3),
              weights=torch.full((2,), 0.5), global_examples=2, weights_active=True)
    assert w.sums() == [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    empty = MetricWindow().summary([0.0] * 6, NoiseTotals())
    assert all(math.isnan(empty[k]) for k in ("loss", "prequential_accuracy", "noise_precision", "noise_recall"))


def test_step_times_count_each_step_in_the_first_bucket_at_or_above_it() -> None:
    times = StepTimes()
    # on an edge (le: included), between two edges, below the first, above the last
    for seconds in (0.005, 0.03, 0.001, 12.0, 0.03):
        times.observe(seconds)
    fields = times.fields()
    buckets = fields["step_seconds_buckets"]
    assert len(buckets) == len(STEP_SECONDS_EDGES) + 1 and fields["step_seconds_count"] == 5 == sum(buckets)
    assert buckets[STEP_SECONDS_EDGES.index(0.005)] == 2  # 0.001 and 0.005
    assert buckets[STEP_SECONDS_EDGES.index(0.05)] == 2  # (0.025, 0.05]
    assert buckets[-1] == 1  # above 10 s
    assert fields["step_seconds_sum"] == pytest.approx(12.066)
    # cumulative in le order, as Prometheus reads it: each edge counts the steps at or below it
    cumulative = dict(zip(STEP_SECONDS_EDGES, accumulate(buckets)))
    assert cumulative[0.005] == 2 and cumulative[0.025] == 2 and cumulative[0.05] == 4 and cumulative[10.0] == 4
    JobReport(step=5, examples=5, **fields)  # what the loop reports validates
    fields["step_seconds_buckets"][0] = 99  # a copy: the report cannot change the running histogram
    assert times.buckets[0] == 2


def test_lag_per_partition_adds_up_over_ranks_and_keeps_zero_apart_from_unknown() -> None:
    # Partition p belongs to rank p mod 2; rank 1 does not know partition 3's end yet.
    rank0, rank1 = {0: 5, 2: 0}, {1: 12}
    summed = [a + b for a, b in zip(lag_vector(rank0, 4), lag_vector(rank1, 4))]
    assert lag_from_vector(summed) == {0: 5, 1: 12, 2: 0}
    assert lag_from_vector(lag_vector({}, 3)) == {}


def test_reports_of_older_workers_still_validate_with_the_new_fields_empty() -> None:
    old = JobReport.model_validate_json('{"step": 3, "examples": 96, "lag": 4}')
    assert old.lag_per_partition == {} and old.step_seconds_buckets == [] and old.step_seconds_count == 0
    assert old.checkpoint_seconds is None


def test_report_fields_round_trip_through_json() -> None:
    times = StepTimes()
    times.observe(0.007)
    times.observe(0.008)
    report = JobReport(step=2, examples=64, lag=9, lag_per_partition={0: 9, 3: 0}, checkpoint_seconds=0.25,
                       **times.fields())
    assert JobReport.model_validate_json(report.model_dump_json()) == report  # partition keys back to int


@pytest.mark.parametrize(("fields", "problem"), [
    ({"step_seconds_buckets": [1, 2], "step_seconds_count": 3}, "needs 12"),
    ({"step_seconds_buckets": [1] + [0] * len(STEP_SECONDS_EDGES), "step_seconds_count": 2}, "add up to 1"),
    ({"lag_per_partition": {0: -1}}, "lag_per_partition"),
    ({"checkpoint_seconds": -0.5}, "checkpoint_seconds"),
])
def test_inconsistent_report_fields_are_refused_naming_them(fields: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        JobReport(step=1, examples=1, **fields)


def test_a_weight_histogram_not_over_cicw_bins_is_refused() -> None:
    with pytest.raises(ValidationError, match="weight_histogram"):
        CICWStepStats(num_examples=4, weight_histogram=[4.0, 0.0])
