"""Instance weights (CIW): the closed-form inner maximisation over the examples of a batch."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from .distributed import GlobalBatch, gather_rows, resolve_group
from .validation import check_choice, check_finite_number, check_finite_tensor

InstanceDivergence = Literal["alpha", "tv"]
INSTANCE_DIVERGENCES = ("alpha", "tv")

# Below this distance from 1 the alpha family is evaluated as its KL limit: the power form
# needs 1/(alpha-1), which loses every digit of (1-alpha)*l + lam in float64 near alpha = 1.
_KL_ALPHA_TOLERANCE = 1e-8


def instance_weights(
    losses: Tensor,
    *,
    divergence: InstanceDivergence = "alpha",
    alpha: float = 1.0,
    lam: float = 1.0,
    radius: float | None = None,
    group: ProcessGroup | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Importance weights over the examples of a (global) minibatch.

    Solves :math:`\min_{w \in \Delta_n} \sum_i w_i \ell_i + \lambda D(w \,\|\, u)` with u uniform:

    - ``divergence="alpha"``: Amari alpha-divergence, closed form normalised to the simplex.
      ``alpha=1`` (KL): :math:`w \propto \exp(-\ell/\lambda)`; otherwise
      :math:`w_i \propto \max((1-\alpha)\ell_i + \lambda, 0)^{1/(\alpha-1)}` (``alpha=0``:
      :math:`1/(\ell+\lambda)`; ``alpha=2``: :math:`\max(\lambda-\ell, 0)`). For alpha != 1 this is
      the simplex optimum for a batch-dependent effective lambda. Evaluated as a softmax of
      log-weights, so tiny ``lam`` or huge losses cannot underflow to 0/0; when ``alpha > 1``
      zeroes every example, the mass goes to the smallest-loss examples (the ``lam -> 0`` limit).
    - ``divergence="tv"``: :math:`\tfrac12\|w-u\|_1 \le` ``radius`` (``lam`` unused). A linear
      programme: mass ``radius`` moves from the highest-loss examples (at most 1/n each) to the
      lowest-loss one.

    Higher weight means more trusted (lower loss). The weights carry no gradient (Danskin): use
    ``(w * losses).sum()`` as the batch loss. Losses are expected non-negative (e.g. per-example
    cross entropy).

    Distributed: when torch.distributed is initialised (or ``group`` is given) the batch is the
    union of every rank's ``losses``; the returned tensor is this rank's slice of the global
    weights (summing to 1 over all ranks together, not per rank).

    Shape:
        losses: [n] -> [n], dtype of ``losses`` (at least float32).

    Example:
        >>> w = instance_weights(torch.tensor([0.1, 0.2, 5.0]), lam=0.5)
        >>> bool(w[2] < w[0]) and abs(float(w.sum()) - 1) < 1e-6
        True
    """
    check_choice("divergence", divergence, INSTANCE_DIVERGENCES)
    if losses.dim() != 1:
        raise ValueError(f"losses must be a 1-D tensor [n], got shape {tuple(losses.shape)}")
    if not losses.dtype.is_floating_point:
        raise ValueError(f"losses must be a floating tensor, got {losses.dtype}")
    if divergence == "alpha":
        check_finite_number("alpha", alpha)
        check_finite_number("lam", lam, minimum=0.0, strict=True)
    else:
        if radius is None:
            raise ValueError("divergence='tv' needs radius (the TV budget, in [0, 1])")
        check_finite_number("radius", radius, minimum=0.0)
    if validate_args:
        check_finite_tensor("losses", losses)

    group = resolve_group(group)
    batch = GlobalBatch.exchange(losses.shape[0], losses.device, group)
    all_losses = gather_rows(losses.detach(), batch, group)
    weights = global_instance_weights(all_losses, divergence=divergence, alpha=alpha, lam=lam,
                                      radius=radius)
    return weights[batch.local].to(_out_dtype(losses))


def global_instance_weights(losses: Tensor, *, divergence: str, alpha: float, lam: float,
                            radius: float | None) -> Tensor:
    """Weights for a batch already gathered on this rank; arguments assumed valid. [N] -> [N] float64."""
    l = losses.detach().to(torch.float64)
    if l.shape[0] == 0:
        return l
    if divergence == "tv":
        return _tv_weights(l, float(radius))  # type: ignore[arg-type]
    return torch.softmax(_alpha_log_weights(l, alpha, lam), dim=0)


def _out_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _alpha_log_weights(l: Tensor, alpha: float, lam: float) -> Tensor:
    if abs(alpha - 1.0) < _KL_ALPHA_TOLERANCE:
        return -l / lam
    base = (1.0 - alpha) * l + lam
    tiny = torch.finfo(l.dtype).tiny
    logw = torch.log(base.clamp_min(tiny)) / (alpha - 1.0)
    if alpha < 1.0:
        return logw
    # alpha > 1: examples at or past the threshold lam/(alpha-1) get weight exactly 0.
    alive = base > 0
    logw = torch.where(alive, logw, torch.full_like(logw, -torch.inf))
    fallback = torch.where(l == l.min(), 0.0, -torch.inf)
    return torch.where(alive.any(), logw, fallback)


def _tv_weights(l: Tensor, radius: float) -> Tensor:
    n = l.shape[0]
    budget = min(radius, (n - 1) / n)
    order = torch.argsort(l, descending=True)  # the last position holds a lowest-loss example
    rank = torch.arange(n, device=l.device, dtype=l.dtype)
    taken = (budget - rank / n).clamp(0.0, 1.0 / n)
    taken[-1] = 0.0
    sorted_w = torch.full_like(l, 1.0 / n) - taken
    sorted_w[-1] += taken.sum()
    return torch.empty_like(l).scatter_(0, order, sorted_w)



def cap_class_shares(weights: Tensor, labels: Tensor, num_classes: int, cap: float) -> Tensor:
    """Limit each given label's total weight to ``cap`` times its share of the examples; the
    other classes are scaled up alike to keep the sum at 1 (water-filling): weights still move
    between classes (a class the model disputes can lose weight) but cannot pile onto one.
    ``cap`` = 1 gives every class exactly its share.

    Shape: weights [N] (summing to 1), labels [N] int64 in [0, K) -> [N], summing to 1.
    """
    if weights.numel() == 0:
        return weights
    tiny = torch.finfo(weights.dtype).tiny
    limit = cap * torch.bincount(labels, minlength=num_classes).to(weights.dtype) / weights.numel()
    per_class = torch.zeros(num_classes, dtype=weights.dtype, device=weights.device).index_add_(0, labels, weights)
    capped = per_class > limit
    target = per_class
    for _ in range(num_classes):  # each round caps at least one more class, or ends
        free = (1 - limit[capped].sum()) / per_class[~capped].sum().clamp_min(tiny)
        target = torch.where(capped, limit, per_class * free)
        newly = ~capped & (target > limit * (1 + 1e-12))
        if not bool(newly.any()):
            break
        capped |= newly
    return weights * (target / per_class.clamp_min(tiny))[labels]
