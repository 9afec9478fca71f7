"""Synthetic label noise models (for benchmarks and the producer). Pure tensor functions."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .validation import check_choice

NOISE_KINDS = ("symmetric", "uniform", "asymmetric")

# CIFAR-10 classes: airplane 0, automobile 1, bird 2, cat 3, deer 4, dog 5, frog 6, horse 7,
# ship 8, truck 9. The paper's asymmetric map: truck->automobile, bird->airplane,
# deer->horse, cat<->dog.
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def corrupt_labels(labels: Tensor, *, kind: str, rate: float, num_classes: int,
                   class_map: Mapping[int, int] | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Corrupt each label independently with probability ``rate``.

    - ``"symmetric"``: replaced by a uniformly drawn *different* class.
    - ``"uniform"``: replaced by a uniformly drawn class, possibly the true one (so the observed
      corruption rate is ``rate * (K-1)/K``).
    - ``"asymmetric"``: classes in ``class_map`` flip to their image; other classes never flip.

    Shape: labels [n] int64 -> (noisy labels [n], corrupted mask [n] bool, True where the
    returned label differs from the given one).
    """
    check_choice("kind", kind, NOISE_KINDS)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    labels = labels.long()
    flip = torch.rand(labels.shape, generator=generator) < rate
    if kind == "symmetric":
        offset = torch.randint(1, num_classes, labels.shape, generator=generator)
        candidate = (labels + offset) % num_classes
    elif kind == "uniform":
        candidate = torch.randint(0, num_classes, labels.shape, generator=generator)
    else:
        if not class_map:
            raise ValueError("asymmetric noise needs class_map (source class -> target class)")
        table = torch.arange(num_classes)
        for src, dst in class_map.items():
            if not (0 <= src < num_classes and 0 <= dst < num_classes):
                raise ValueError(f"class_map entry {src}->{dst} is outside [0, {num_classes})")
            table[src] = dst
        candidate = table[labels]
    noisy = torch.where(flip, candidate, labels)
    return noisy, noisy != labels
