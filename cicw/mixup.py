"""Weighted mixup (the M in CICW-M): partners and mixing ratios from the instance weights."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from .distributed import GlobalBatch, broadcast_from_first, gather_rows, resolve_group
from .validation import check_choice, check_finite_number

MixupMode = Literal["sample_weight", "sample", "weight", "simple", "label_smoothing"]
MIXUP_MODES = ("sample_weight", "sample", "weight", "simple", "label_smoothing")

# Marsaglia-Tsang accepts a proposal with probability > 0.95 for shape >= 1; after this many
# vectorised rounds the chance that any of 10^6 draws is still pending is below 10^-4.
_GAMMA_ROUNDS = 8


def weighted_mixup(
    x: Tensor,
    y_soft: Tensor,
    weights: Tensor,
    *,
    mode: MixupMode = "sample_weight",
    beta: float = 2.0,
    power: float = 1.0,
    generator: torch.Generator | None = None,
    predictions: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Mix each example with a partner chosen using the instance weights.

    With :math:`m = w^p / \sum w^p` over the (global) batch:

    - ``"sample_weight"`` (CICW-M): partner :math:`j_i \sim \mathrm{Cat}(m)` with replacement,
      ratio :math:`r_i = m_i/(m_i+m_j)`: trusted examples are picked as partners and dominate.
    - ``"sample"``: partner :math:`\sim \mathrm{Cat}(m)`, :math:`r \sim \mathrm{Beta}(a, a)`.
    - ``"weight"``: partner from a random permutation, :math:`r_i = m_i/(m_i+m_j)`.
    - ``"simple"``: plain mixup (permutation, Beta ratio); weights unused.
    - ``"label_smoothing"``: targets first move towards the model's argmax prediction,
      :math:`y \leftarrow s y + (1-s)\,\mathrm{onehot}(\arg\max p)` with s the min-max scaled m
      (low weight = more smoothing), then plain mixup. Needs ``predictions``.

    Then :math:`\tilde x = r x + (1-r) x_j`, :math:`\tilde y = r y + (1-r) y_j`. A 0/0 ratio
    (both weights zero) becomes 1/2. Draws use ``generator`` (on its device) when given.

    Distributed: partners are drawn over the global batch (inputs and targets are all-gathered;
    the draw is made on the group's first rank and broadcast). Returns this rank's rows.

    Shape:
        x: [n, *] inputs, y_soft: [n, K] targets on the simplex, weights: [n] (this rank's slice of
        the global weights, e.g. from :func:`cicw.instance_weights`), predictions: [n, K] logits or
        probabilities. Returns (x_mixed [n, *], y_mixed [n, K]). No gradient flows to x or y.

    Example:
        >>> x, y = torch.eye(4), torch.eye(4)
        >>> xm, ym = weighted_mixup(x, y, torch.tensor([0.7, 0.1, 0.1, 0.1]),
        ...                         generator=torch.Generator().manual_seed(0))
        >>> xm.shape, bool(torch.allclose(ym.sum(1), torch.ones(4)))
        (torch.Size([4, 4]), True)
    """
    check_choice("mode", mode, MIXUP_MODES)
    check_finite_number("beta", beta, minimum=0.0, strict=True)
    check_finite_number("power", power, minimum=0.0, strict=True)
    n = x.shape[0]
    if y_soft.dim() != 2 or y_soft.shape[0] != n:
        raise ValueError(f"y_soft must be [n, K] with n = {n} rows, got shape {tuple(y_soft.shape)}")
    if weights.dim() != 1 or weights.shape[0] != n:
        raise ValueError(f"weights must be [n] with n = {n}, got shape {tuple(weights.shape)}")
    if mode == "label_smoothing":
        if predictions is None:
            raise ValueError("mode='label_smoothing' needs predictions (the model's [n, K] outputs)")
        if tuple(predictions.shape) != tuple(y_soft.shape):
            raise ValueError(f"predictions must have shape {tuple(y_soft.shape)}, "
                             f"got {tuple(predictions.shape)}")

    group = resolve_group(group)
    batch = GlobalBatch.exchange(n, x.device, group)
    with torch.no_grad():
        all_w = gather_rows(weights.detach().to(torch.float64), batch, group)
        all_x = gather_rows(x.detach(), batch, group)
        all_y = gather_rows(y_soft.detach(), batch, group)
        m = _mixing_mass(all_w, power)
        if mode == "label_smoothing":
            all_p = gather_rows(predictions.detach(), batch, group)  # type: ignore[union-attr]
            all_y = _smooth_towards_prediction(all_y, all_p, m)
        partner, ratio = _draw(m, mode, beta, generator, x.device)
        partner = broadcast_from_first(partner, group)
        ratio = broadcast_from_first(ratio, group)
        mine = batch.local
        partner, ratio = partner[mine], ratio[mine]
        r_x = ratio.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        r_y = ratio.to(all_y.dtype).unsqueeze(1)
        x_mixed = r_x * all_x[mine] + (1 - r_x) * all_x[partner]
        y_mixed = r_y * all_y[mine] + (1 - r_y) * all_y[partner]
    return x_mixed, y_mixed


def _mixing_mass(w: Tensor, power: float) -> Tensor:
    m = w.clamp_min(0.0) ** power
    total = m.sum()
    uniform = torch.full_like(m, 1.0 / max(m.shape[0], 1))
    return torch.where(total > 0, m / total.clamp_min(torch.finfo(m.dtype).tiny), uniform)


def _smooth_towards_prediction(y: Tensor, predictions: Tensor, m: Tensor) -> Tensor:
    # Min-max scaling widened by 0.01 on each side, as in the method's reference, so the
    # lowest-weighted example still keeps some of its label and the highest is not exactly 1.
    lo = (m.min() - 0.01).clamp_min(0.0)
    hi = (m.max() + 0.01).clamp_max(1.0)
    s = ((m - lo) / (hi - lo)).to(y.dtype).unsqueeze(1)
    predicted = torch.zeros_like(y).scatter_(1, predictions.argmax(1, keepdim=True), 1.0)
    return s * y + (1 - s) * predicted


def _draw(m: Tensor, mode: str, beta: float, generator: torch.Generator | None,
          device: torch.device) -> tuple[Tensor, Tensor]:
    """Partner indices [N] (int64) and own-share ratios [N] (float64) on ``device``."""
    n = m.shape[0]
    draw_device = generator.device if generator is not None else device
    if n == 0:
        return (torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(0, dtype=torch.float64, device=device))
    m_d = m.to(draw_device)
    if mode in ("sample_weight", "sample"):
        partner = torch.multinomial(m_d, n, replacement=True, generator=generator)
    else:
        partner = torch.randperm(n, generator=generator, device=draw_device)
    if mode in ("sample_weight", "weight"):
        pair = m_d + m_d[partner]
        ratio = torch.where(pair > 0, m_d / pair.clamp_min(torch.finfo(m_d.dtype).tiny),
                            torch.full_like(m_d, 0.5))
    else:
        ratio = sample_beta(beta, n, generator=generator, device=draw_device)
    return partner.to(device), ratio.to(device)


def sample_beta(a: float, n: int, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """n draws from Beta(a, a) as G1/(G1+G2) with Gamma(a) draws that honour ``generator``.

    Shape: -> [n] float64.
    """
    g1 = _sample_gamma(a, n, generator, torch.device(device))
    g2 = _sample_gamma(a, n, generator, torch.device(device))
    total = g1 + g2
    return torch.where(total > 0, g1 / total.clamp_min(torch.finfo(total.dtype).tiny),
                       torch.full_like(total, 0.5))


def _sample_gamma(a: float, n: int, generator: torch.Generator | None,
                  device: torch.device) -> Tensor:
    # Marsaglia & Tsang (2000) for shape >= 1; shape < 1 via Gamma(a+1) * U^(1/a).
    shape = a if a >= 1.0 else a + 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.full((n,), d, dtype=torch.float64, device=device)  # the mode, if never accepted
    pending = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(_GAMMA_ROUNDS):
        z = torch.randn(n, dtype=torch.float64, device=device, generator=generator)
        u = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = pending & ok
        out = torch.where(take, d * v, out)
        pending = pending & ~ok
    if a < 1.0:
        u = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        out = out * u ** (1.0 / a)
    return out
