"""What a job reports between two reports: prequential (test-then-train) accuracy, loss, records/s,
and how well the weights find known label noise. Sums are kept per rank and added over ranks by
the caller, so the reported numbers are global."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

# An example counts as "down-weighted" when its weight is under a quarter of uniform (n*w < 1/4),
# the same threshold as the CICW diagnostics' low-weight fraction.
DOWN_WEIGHTED_BELOW = 0.25
SUMMED = ("correct", "seen", "loss", "down", "corrupted", "hit")


@dataclass
class MetricWindow:
    """Sums over the steps since the last report, for this rank."""

    clock: Callable[[], float] = time.monotonic
    correct: float = 0.0
    seen: float = 0.0
    loss: float = 0.0  # this rank's share of each step's global loss
    down: float = 0.0
    corrupted: float = 0.0
    hit: float = 0.0  # down-weighted and corrupted
    steps: int = 0
    examples: int = 0  # global, the same on every rank
    started: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def observe(self, *, loss: Tensor, targets: Tensor, clean_labels: Tensor, logits: Tensor | None,
                weights: Tensor, global_examples: int, weights_active: bool) -> None:
        """Add one optimizer step.

        targets: [n] class indices or [n, K] probabilities; clean_labels: [n], -1 where unknown;
        logits: [n, K] from before the update (None when the step forwarded only mixed inputs);
        weights: [n] this rank's share of the global instance weights (summing to 1 globally).
        """
        self.steps += 1
        self.examples += global_examples
        self.loss += float(loss.detach())
        if targets.dim() != 1:  # probability rows: neither accuracy nor noise is defined
            return
        if logits is not None:
            self.correct += float((logits.argmax(1) == targets).sum())
            self.seen += len(targets)
        if weights_active:
            clean = clean_labels.to(targets.device)
            known = clean >= 0
            corrupted = known & (clean != targets)
            down = known & (weights * global_examples < DOWN_WEIGHTED_BELOW)
            self.hit += float((down & corrupted).sum())
            self.down += float(down.sum())
            self.corrupted += float(corrupted.sum())

    def sums(self) -> list[float]:
        """This rank's sums, in :data:`SUMMED` order, for an all-reduce."""
        return [getattr(self, name) for name in SUMMED]

    def summary(self, global_sums: list[float], noise: NoiseTotals) -> dict[str, float]:
        """Metrics from the sums over all ranks (in :data:`SUMMED` order); noise detection is
        reported cumulatively, from ``noise`` (the job's totals, this window's included)."""
        g = dict(zip(SUMMED, global_sums, strict=True))
        elapsed = self.clock() - self.started
        nan = float("nan")
        return {"records_per_s": self.examples / elapsed if elapsed > 0 else nan,
                "loss": g["loss"] / self.steps if self.steps else nan,
                "prequential_accuracy": g["correct"] / g["seen"] if g["seen"] else nan,
                "noise_precision": noise.hit / noise.down if noise.down else nan,
                "noise_recall": noise.hit / noise.corrupted if noise.corrupted else nan}


@dataclass
class NoiseTotals:
    """Over the job's life (checkpointed): examples down-weighted, with a corrupted label (their
    clean-label header differs), and both."""

    down: int = 0
    corrupted: int = 0
    hit: int = 0

    def add(self, global_sums: list[float]) -> None:
        """Count a window's sums over all ranks (in :data:`SUMMED` order)."""
        g = dict(zip(SUMMED, global_sums, strict=True))
        self.down += int(g["down"])
        self.corrupted += int(g["corrupted"])
        self.hit += int(g["hit"])
