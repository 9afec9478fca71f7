"""Synthetic label noise: rates, the 'different class' guarantee, the asymmetric map."""

from __future__ import annotations

import pytest
import torch

from cicw.noise import CIFAR10_ASYMMETRIC_MAP, corrupt_labels


def test_symmetric_flips_at_rate_and_always_to_another_class() -> None:
    labels = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(0))
    noisy, corrupted = corrupt_labels(labels, kind="symmetric", rate=0.4, num_classes=10,
                                      generator=torch.Generator().manual_seed(1))
    assert float(corrupted.float().mean()) == pytest.approx(0.4, abs=0.01)
    assert torch.equal(corrupted, noisy != labels)
    # wrong labels spread evenly over the other nine classes
    wrong = noisy[corrupted & (labels == 3)]
    counts = torch.bincount(wrong, minlength=10).float()
    assert counts[3] == 0 and counts[[0, 1, 2, 4, 5, 6, 7, 8, 9]].std() / counts.sum() < 0.01


def test_uniform_noise_can_keep_the_true_class() -> None:
    labels = torch.zeros(100_000, dtype=torch.long)
    _, corrupted = corrupt_labels(labels, kind="uniform", rate=0.5, num_classes=4,
                                  generator=torch.Generator().manual_seed(2))
    assert float(corrupted.float().mean()) == pytest.approx(0.5 * 3 / 4, abs=0.01)


def test_asymmetric_uses_the_map_only() -> None:
    labels = torch.arange(10).repeat(10_000)
    noisy, corrupted = corrupt_labels(labels, kind="asymmetric", rate=1.0, num_classes=10,
                                      class_map=CIFAR10_ASYMMETRIC_MAP)
    expected = torch.tensor([0, 1, 0, 5, 7, 3, 6, 7, 8, 1]).repeat(10_000)
    assert torch.equal(noisy, expected)
    assert not corrupted[labels == 6].any()


def test_noise_argument_errors() -> None:
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="kind must be one of"):
        corrupt_labels(labels, kind="pairflip", rate=0.1, num_classes=3)
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(labels, kind="symmetric", rate=1.5, num_classes=3)
    with pytest.raises(ValueError, match="class_map"):
        corrupt_labels(labels, kind="asymmetric", rate=0.1, num_classes=3)
    with pytest.raises(ValueError, match="labels must be in"):
        corrupt_labels(torch.tensor([5]), kind="symmetric", rate=0.1, num_classes=3)
