"""When to switch reweighting on: once the model fits its training examples better than examples
it never trains on (a generalisation gap), which is when it starts to memorise wrong labels.

A single pass over a stream never shows such a gap: every batch is new, so the weights and mixup
would only cost accuracy there (they slow learning and, at extreme noise, let a weak model's
preferred class take over). When examples come back (a replayed topic, a model trained for many
passes), the model starts to fit their labels, wrong ones included, and the loss of the examples
it trains on drops below the loss of those it never saw: that is the signal, measured on a
fixed, content-identified holdout, not a step count or a known noise rate.

Nothing is stored per example: an example's holdout membership is a hash of its identifier.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Fibonacci hashing: the multiplier spreads consecutive ids over the whole 64-bit range, and its
# top bits decide membership, so any id scheme (indices, content hashes) gives the same fraction.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_HASH_BITS = 24
# Random odd multipliers for hashing feature bytes into ids; fixed so an example hashes the
# same in every process, run and checkpoint.
_FEATURE_SEED = 20211110
_STATE_VERSION = 1


def holdout_mask(example_ids: Tensor, fraction: float) -> Tensor:
    """Which examples are held out (never trained on): a fixed ``fraction`` of all ids.

    Shape: example_ids [n] int64 -> [n] bool. The same id is always in the same part.
    """
    if example_ids.dtype != torch.int64:
        raise TypeError(f"example_ids must be int64, got {example_ids.dtype}")
    top = (example_ids * _GOLDEN) >> (64 - _HASH_BITS)
    return (top & ((1 << _HASH_BITS) - 1)) < int(fraction * (1 << _HASH_BITS))


def feature_ids(inputs: Tensor) -> Tensor:
    """A 64-bit identifier per example from its feature values, for streams whose records carry
    no stable id: the same example produced again (a replay) gets the same id.

    Shape: inputs [n, *] (any dtype) -> [n] int64. Uses the values' bytes, so pass features
    before any random augmentation.
    """
    n = inputs.shape[0]
    flat = inputs.detach().reshape(n, math.prod(inputs.shape[1:])).contiguous()  # n may be 0 (an idle rank)
    if flat.dtype.is_floating_point:
        flat = flat.float().view(torch.int32)
    words = flat.to(torch.int64)
    mult = _feature_multipliers(words.shape[1]).to(words.device)
    # A sum of products wraps around in int64: a random linear hash over the feature words.
    return (words * mult).sum(1) ^ words.shape[1]


@functools.lru_cache(maxsize=8)
def _feature_multipliers(width: int) -> Tensor:
    """[width] odd int64 multipliers (CPU), drawn once per feature width rather than every step."""
    g = torch.Generator().manual_seed(_FEATURE_SEED)
    return torch.randint(1, 1 << 62, (width,), generator=g, dtype=torch.int64) | 1


@dataclass
class _DecayedMoments:
    """Exponentially decayed sums over examples: count, loss, loss squared, squared weights
    (for the effective number of examples behind the weighted mean)."""

    count: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    weight_squares: float = 0.0

    def add(self, decay: float, count: float, total: float, squares: float) -> None:
        keep = 1.0 - decay
        self.count = keep * self.count + count
        self.total = keep * self.total + total
        self.squares = keep * self.squares + squares
        self.weight_squares = keep * keep * self.weight_squares + count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan

    @property
    def effective_count(self) -> float:
        return self.count * self.count / self.weight_squares if self.weight_squares > 0 else 0.0

    def squared_error(self) -> float:
        """Squared standard error of :attr:`mean`."""
        if self.effective_count < 2:
            return math.inf
        variance = max(self.squares / self.count - self.mean ** 2, 0.0)
        return variance / self.effective_count


class MemorizationGate:
    """Opens, once and for good, when the mean loss of the examples trained on stays
    significantly below that of the held-out examples.

    ``z``: how many standard errors the gap must reach; ``patience``: for how many consecutive
    steps (a running mean checked every step crosses any threshold now and then by chance over
    a long stream; memorisation does not come and go); ``decay``: per-step decay of the running
    means (0.02 looks back about 50 steps); ``min_holdout``: held-out examples (effective count)
    needed before any decision.

    Example:
        >>> gate = MemorizationGate()
        >>> for step in range(200):
        ...     gate.observe(train=torch.full((120,), 0.5) + 0.1 * torch.randn(120),
        ...                  holdout=torch.full((8,), 1.0) + 0.1 * torch.randn(8), step=step)
        >>> gate.is_open
        True
    """

    def __init__(self, *, z: float = 4.0, patience: int = 10, decay: float = 0.02, min_holdout: int = 64) -> None:
        if not z > 0 or patience < 1 or not 0 < decay < 1 or min_holdout < 2:
            raise ValueError("need z > 0, patience >= 1, 0 < decay < 1 and min_holdout >= 2")
        self.z = float(z)
        self.patience = int(patience)
        self.streak = 0  # consecutive steps with the gap above z standard errors
        self.decay = float(decay)
        self.min_holdout = int(min_holdout)
        self.train = _DecayedMoments()
        self.holdout = _DecayedMoments()
        self.opened_at: int | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def gap(self) -> float:
        """Held-out minus trained-on mean loss (nats); NaN before both were seen."""
        return self.holdout.mean - self.train.mean

    @property
    def z_score(self) -> float:
        """The gap in standard errors (0 before enough held-out examples were seen)."""
        if self.holdout.effective_count < self.min_holdout:
            return 0.0
        se = math.sqrt(self.holdout.squared_error() + self.train.squared_error())
        return self.gap / se if se > 0 else 0.0

    def observe(self, *, train: Tensor, holdout: Tensor, step: int) -> None:
        """Add one step's per-example losses (detached; train [m], holdout [h], either may be
        empty) and open the gate at ``step`` if the gap is significant."""
        self.observe_sums(train=_sums(train), holdout=_sums(holdout), step=step)

    def observe_sums(self, *, train: tuple[float, float, float], holdout: tuple[float, float, float],
                     step: int) -> None:
        """:meth:`observe` from (count, sum, sum of squares) of each part, e.g. all-reduced over
        ranks so that every rank decides alike."""
        self.train.add(self.decay, *train)
        self.holdout.add(self.decay, *holdout)
        if self.opened_at is not None:
            return
        self.streak = self.streak + 1 if self.z_score > self.z else 0
        if self.streak >= self.patience:
            self.opened_at = step

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "opened_at": self.opened_at, "streak": self.streak,
                "train": vars(self.train).copy(), "holdout": vars(self.holdout).copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported MemorizationGate state version {state.get('version')!r}")
        self.opened_at = state["opened_at"]
        self.streak = int(state["streak"])
        self.train = _DecayedMoments(**state["train"])
        self.holdout = _DecayedMoments(**state["holdout"])


def _sums(losses: Tensor) -> tuple[float, float, float]:
    values = losses.detach().double()
    return float(values.numel()), float(values.sum()), float((values * values).sum())
