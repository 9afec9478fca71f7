"""What a job reports between two reports: prequential (test-then-train) accuracy, loss, records/s,
and how well the weights find known label noise. Sums are kept per rank and added over ranks by
the caller, so the reported numbers are global. Also what a report carries over the whole run:
the optimizer-step time histogram (:class:`StepTimes`), and the consumer lag per partition packed
for a sum over ranks (:func:`lag_vector`, :func:`lag_from_vector`)."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..report import STEP_SECONDS_EDGES

# An example counts as "down-weighted" when its weight is under a quarter of uniform (n*w < 1/4),
# the same threshold as the CICW diagnostics' low-weight fraction.
DOWN_WEIGHTED_BELOW = 0.25
SUMMED = ("correct", "seen", "loss", "down", "corrupted", "hit")
# Steps a window holds uncounted at most (their tensors: about 15 numbers per example).
PENDING_STEPS = 64


@dataclass(frozen=True)
class _ScoredStep:
    """What a step leaves for the window's sums until they are read (tensors detached): targets
    [n] class indices, clean_labels [n], logits [n, K] or None, scaled [n] N*w or None."""

    targets: Tensor
    clean_labels: Tensor
    logits: Tensor | None
    scaled: Tensor | None

    @property
    def kind(self) -> tuple[bool, bool]:
        return self.logits is not None, self.scaled is not None


@dataclass
class MetricWindow:
    """Sums over the steps since the last report, for this rank. A step's accuracy and noise
    counts are taken when the sums are read, over all pending steps at once: a handful of torch
    ops per report instead of per step, which the training thread would pay between steps."""

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
    pending: list[_ScoredStep] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def observe(self, *, loss: Tensor, targets: Tensor, clean_labels: Tensor, logits: Tensor | None,
                weights: Tensor, global_examples: int, weights_active: bool) -> None:
        """Add one optimizer step. Reads the loss back (on a GPU: waits for the step's kernels).

        targets: [n] class indices or [n, K] probabilities; clean_labels: [n], -1 where unknown;
        logits: [n, K] from before the update (None when the step forwarded only mixed inputs);
        weights: [n] this rank's share of the global instance weights (summing to 1 globally).
        """
        self.steps += 1
        self.examples += global_examples
        self.loss += float(loss.detach())
        if targets.dim() != 1:  # probability rows: neither accuracy nor noise is defined
            return
        self.pending.append(_ScoredStep(
            targets.detach(), clean_labels, None if logits is None else logits.detach(),
            weights.detach() * global_examples if weights_active else None))
        if len(self.pending) >= PENDING_STEPS:
            self._settle()

    def _settle(self) -> None:
        """Count the pending steps, consecutive steps of one kind in one go."""
        for (scored, weighed), run in itertools.groupby(self.pending, key=lambda s: s.kind):
            steps = list(run)
            targets = torch.cat([s.targets for s in steps])
            if scored:
                logits = torch.cat([s.logits for s in steps if s.logits is not None])
                self.correct += float((logits.argmax(1) == targets).sum())
                self.seen += len(targets)
            if weighed:
                clean = torch.cat([s.clean_labels for s in steps]).to(targets.device)
                scaled = torch.cat([s.scaled for s in steps if s.scaled is not None])
                known = clean >= 0
                corrupted = known & (clean != targets)
                down = known & (scaled < DOWN_WEIGHTED_BELOW)
                self.hit += float((down & corrupted).sum())
                self.down += float(down.sum())
                self.corrupted += float(corrupted.sum())
        self.pending = []

    def sums(self) -> list[float]:
        """This rank's sums, in :data:`SUMMED` order, for an all-reduce."""
        self._settle()
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


@dataclass
class StepTimes:
    """Optimizer-step wall times since this worker started, as a histogram over
    workers.report.STEP_SECONDS_EDGES (never reset by a report: the service exposes it as a
    Prometheus histogram, whose buckets only grow)."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(STEP_SECONDS_EDGES) + 1))
    total_s: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Count one step: in the first bin whose edge is >= ``seconds`` (Prometheus ``le``), or the last."""
        self.buckets[bisect.bisect_left(STEP_SECONDS_EDGES, seconds)] += 1
        self.total_s += seconds
        self.count += 1

    def fields(self) -> dict[str, Any]:
        """The JobReport fields step_seconds_buckets, step_seconds_sum and step_seconds_count."""
        return {"step_seconds_buckets": list(self.buckets), "step_seconds_sum": self.total_s,
                "step_seconds_count": self.count}


def lag_vector(lag: Mapping[int, int], size: int) -> list[float]:
    """This rank's lag per partition as ``size`` numbers to be summed over ranks: lag + 1 at each
    partition in ``lag``, 0 elsewhere. A partition is read by one rank only, so after the sum an
    entry above 0 is that rank's lag + 1, and 0 means no rank knows the partition's end (which
    a plain lag of 0 could not tell apart). ``size`` must exceed every partition in ``lag``."""
    out = [0.0] * size
    for partition, records in lag.items():
        out[partition] = records + 1.0
    return out


def lag_from_vector(summed: Sequence[float]) -> dict[int, int]:
    """Partition -> lag, from :func:`lag_vector`'s numbers summed over ranks."""
    return {p: int(v) - 1 for p, v in enumerate(summed) if v > 0}
