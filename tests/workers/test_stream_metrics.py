"""MetricWindow: prequential accuracy, loss, rate and noise detection from step outputs."""

from __future__ import annotations

import math

import torch

from workers.train.metrics import MetricWindow, NoiseTotals


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
