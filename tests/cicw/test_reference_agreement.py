"""Closed forms against a generic convex solver (cvxpy) on many seeded random batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cicw

from .cvxpy_reference import class_inner_loss, kl_instance_weights, tv_instance_objective

GAMMAS = {"kl": (0.001, 0.01, 0.1, 1.0), "tv": (0.01, 0.1, 0.4), "l1": (0.02, 0.2, 0.8),
          "l2": (0.001, 0.05, 0.5)}


def _targets(kind: str, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    if kind == "one-hot":
        idx = torch.randint(0, k, (n,), generator=g)
        return idx, np.eye(k)[idx.numpy()]
    if kind == "mixup":
        a, b = torch.randint(0, k, (2, n), generator=g)
        r = torch.rand(n, 1, generator=g, dtype=torch.float64) ** 3
        y = r * torch.nn.functional.one_hot(a, k) + (1 - r) * torch.nn.functional.one_hot(b, k)
    else:  # dirichlet: arbitrary soft rows, some sparse
        y = torch.distributions.Dirichlet(torch.full((k,), 0.5, dtype=torch.float64)).sample((n,))
        y = torch.where(y < 1e-3, torch.zeros_like(y), y)
        y = y / y.sum(1, keepdim=True)
    return y, y.numpy()


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("kind", ["one-hot", "mixup", "dirichlet"])
@pytest.mark.parametrize("divergence", ["kl", "tv", "l1", "l2"])
def test_class_reweighted_loss_matches_cvxpy(k: int, kind: str, divergence: str) -> None:
    g = torch.Generator().manual_seed(hash((k, kind, divergence)) % 2**31)
    n = 4 if k == 100 else 6
    for gamma in GAMMAS[divergence]:
        scale = float(torch.rand(1, generator=g)) * 6 + 0.5
        lp = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * scale, -1)
        targets, y = _targets(kind, n, k, g)
        ours = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma).numpy()
        for i in range(n):
            ref = class_inner_loss(-lp[i].numpy(), y[i], divergence, gamma)
            assert abs(ours[i] - ref) <= 1e-4 * max(1.0, abs(ref)), (gamma, i, ours[i], ref)


@pytest.mark.parametrize("lam", [0.01, 0.3, 2.0])
def test_kl_instance_weights_match_cvxpy(lam: float) -> None:
    g = torch.Generator().manual_seed(int(lam * 100))
    for n in (1, 5, 32):
        losses = torch.rand(n, generator=g, dtype=torch.float64) * 4
        ours = cicw.instance_weights(losses, alpha=1.0, lam=lam).numpy()
        np.testing.assert_allclose(ours, kl_instance_weights(losses.numpy(), lam), atol=1e-4)


@pytest.mark.parametrize("radius", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_tv_instance_weights_solve_the_lp(radius: float) -> None:
    g = torch.Generator().manual_seed(int(radius * 100))
    for n in (1, 2, 7, 40):
        losses = torch.rand(n, generator=g, dtype=torch.float64) * 3
        w = cicw.instance_weights(losses, divergence="tv", radius=radius)
        assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12
        assert 0.5 * float((w - 1 / n).abs().sum()) <= radius + 1e-12
        assert abs(float(w @ losses) - tv_instance_objective(losses.numpy(), radius)) < 1e-5


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.1, 0.5, 1.5, 2.0, 3.0])
def test_alpha_weights_are_the_normalised_closed_form(alpha: float) -> None:
    # For alpha != 1, w ∝ max((1-alpha) l + lam, 0)^(1/(alpha-1)); computed naively in float64.
    g = torch.Generator().manual_seed(int(alpha * 10) + 50)
    losses = torch.rand(20, generator=g, dtype=torch.float64) * 2
    lam = 0.7
    base = np.maximum((1 - alpha) * losses.numpy() + lam, 0.0)
    with np.errstate(divide="ignore"):
        naive = np.where(base > 0, base ** (1 / (alpha - 1)), 0.0)
    np.testing.assert_allclose(cicw.instance_weights(losses, alpha=alpha, lam=lam).numpy(),
                               naive / naive.sum(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, 2.0, 3.0])
def test_instance_weight_edge_cases_never_nan(alpha: float) -> None:
    cases = [
        torch.tensor([1e4, 2e4, 3.0]),               # huge losses
        torch.full((16,), 0.7),                       # all equal
        torch.tensor([5.0]),                          # batch of one
        torch.tensor([0.0, 1e-9, 50.0, 1e4]),
    ]
    for losses in cases:
        for lam in (1e-6, 1.0, 1e3):
            w = cicw.instance_weights(losses, alpha=alpha, lam=lam)
            assert torch.isfinite(w).all() and (w >= 0).all()
            assert abs(float(w.sum()) - 1.0) < 1e-5
    # every loss past alpha > 1's threshold lam/(alpha-1): mass on the smallest losses
    if alpha > 1:
        w = cicw.instance_weights(torch.tensor([5.0, 3.0, 3.0, 9.0]), alpha=alpha, lam=0.1)
        torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.5, 0.0]))
    all_equal = cicw.instance_weights(torch.full((8,), 2.0), alpha=alpha, lam=1e-6)
    torch.testing.assert_close(all_equal, torch.full((8,), 0.125))
