"""Per-batch statistics of the weights, computed from tensors the step already holds."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from .config import WEIGHT_HISTOGRAM_EDGES

__all__ = ["WEIGHT_HISTOGRAM_EDGES", "CICWDiagnostics"]


class CICWDiagnostics:
    """What the weights did to one global batch. Computed lazily, on the step's device.

    All statistics are over the global batch (every rank's examples), so any rank can report them.

    Attributes (tensors, scalars unless noted):
        num_examples: N, the global batch size.
        ess: effective sample size of the instance weights, 1 / sum w^2 (N when uniform).
        low_weight_fraction: fraction of examples with w < 1/(4N).
        weight_histogram: [8] counts of N*w in bins WEIGHT_HISTOGRAM_EDGES.
        class_count: [K] examples per given (argmax) label.
        class_mean_weight: [K] mean of N*w per given label; NaN for a label absent from the batch.
        class_mass_moved: mean over examples of 0.5*|v - y|_1, the label mass the class weights
            moved off the given label (0 without class reweighting).
        lam: lambda in force; in_burn_in: 1.0 during burn-in.
    """

    def __init__(self, weights: Tensor, labels: Tensor, moved: Tensor, *, num_classes: int,
                 lam: float, in_burn_in: bool) -> None:
        self._w = weights
        self._labels = labels.long()
        self._moved = moved
        self._k = num_classes
        self._lam = lam
        self._in_burn_in = in_burn_in

    @property
    def lam(self) -> Tensor:
        return torch.tensor(self._lam, dtype=torch.float64)

    @property
    def in_burn_in(self) -> Tensor:
        return torch.tensor(float(self._in_burn_in), dtype=torch.float64)

    @property
    def num_examples(self) -> Tensor:
        return torch.tensor(float(self._w.shape[0]), dtype=torch.float64)

    @cached_property
    def ess(self) -> Tensor:
        return 1.0 / (self._w.double() ** 2).sum().clamp_min(torch.finfo(torch.float64).tiny)

    @cached_property
    def _scaled(self) -> Tensor:
        return self._w.double() * self._w.shape[0]

    @cached_property
    def low_weight_fraction(self) -> Tensor:
        if self._w.shape[0] == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return (self._scaled < 0.25).double().mean()

    @cached_property
    def weight_histogram(self) -> Tensor:
        edges = torch.tensor(WEIGHT_HISTOGRAM_EDGES[1:-1], dtype=torch.float64, device=self._w.device)
        bins = torch.bucketize(self._scaled, edges, right=True)
        return torch.bincount(bins, minlength=len(WEIGHT_HISTOGRAM_EDGES) - 1).double()

    @cached_property
    def class_count(self) -> Tensor:
        return torch.bincount(self._labels, minlength=self._k).double()

    @cached_property
    def class_mean_weight(self) -> Tensor:
        sums = torch.zeros(self._k, dtype=torch.float64, device=self._w.device)
        sums.index_add_(0, self._labels, self._scaled)
        count = self.class_count
        return torch.where(count > 0, sums / count.clamp_min(1.0), torch.full_like(sums, torch.nan))

    @cached_property
    def class_mass_moved(self) -> Tensor:
        if self._moved.shape[0] == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self._moved.double().mean()

    def as_dict(self) -> dict[str, float | list[float]]:
        """Plain Python numbers for logging and metrics (synchronises with the device)."""
        return {
            "num_examples": float(self.num_examples),
            "ess": float(self.ess),
            "low_weight_fraction": float(self.low_weight_fraction),
            "weight_histogram": self.weight_histogram.tolist(),
            "class_count": self.class_count.tolist(),
            "class_mean_weight": self.class_mean_weight.tolist(),
            "class_mass_moved": float(self.class_mass_moved),
            "lam": float(self.lam),
            "in_burn_in": float(self.in_burn_in),
        }
