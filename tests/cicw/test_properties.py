"""Property tests: whatever the (finite) input, weights stay on the simplex and in the ball."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cicw

finite_losses = st.lists(st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(losses=finite_losses, alpha=st.floats(-2.0, 4.0), lam=st.floats(1e-6, 1e3))
def test_instance_weights_on_simplex(losses: list[float], alpha: float, lam: float) -> None:
    w = cicw.instance_weights(torch.tensor(losses, dtype=torch.float64), alpha=alpha, lam=lam)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert abs(float(w.sum()) - 1.0) < 1e-9


@settings(max_examples=100, deadline=None)
@given(losses=finite_losses, radius=st.floats(0.0, 1.0))
def test_tv_instance_weights_in_ball(losses: list[float], radius: float) -> None:
    t = torch.tensor(losses, dtype=torch.float64)
    w = cicw.instance_weights(t, divergence="tv", radius=radius)
    n = len(losses)
    assert (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-12
    assert 0.5 * float((w - 1 / n).abs().sum()) <= radius + 1e-12
    assert float(w @ t) <= float(t.mean()) + 1e-9  # never worse than uniform


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 6))
    k = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.01, 30.0))
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * scale, -1)
    if draw(st.booleans()):
        idx = torch.randint(0, k, (n,), generator=g)
        return lp, idx, torch.nn.functional.one_hot(idx, k).double()
    # Soft rows from the seeded generator (never the global RNG, so hypothesis can replay):
    # exp(sigma * z) normalised is near-uniform for small sigma and near one-hot for large.
    y = torch.exp(draw(st.floats(0.0, 8.0)) * torch.randn(n, k, generator=g, dtype=torch.float64))
    y = y / y.sum(1, keepdim=True)
    mask = torch.rand(n, k, generator=g) < draw(st.floats(0.0, 0.8))
    mask[torch.arange(n), y.argmax(1)] = False
    y = torch.where(mask, torch.zeros_like(y), y)
    y = y / y.sum(1, keepdim=True)
    return lp, y, y


def _distance(divergence: str, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if divergence == "kl":
        return torch.where(y > 0, y * torch.log(y / v.clamp_min(1e-300)), torch.zeros_like(y)).sum(1)
    if divergence == "tv":
        return 0.5 * (v - y).abs().sum(1)
    if divergence == "l1":
        return (v - y).abs().sum(1)
    return ((v - y) ** 2).sum(1)


@settings(max_examples=150, deadline=None)
@given(batch=batches(), divergence=st.sampled_from(["kl", "tv", "l1", "l2"]),
       gamma=st.floats(0.0, 3.0))
def test_class_weights_on_simplex_in_ball_and_between_bounds(batch, divergence: str, gamma: float) -> None:  # type: ignore[no-untyped-def]
    lp, targets, y = batch
    L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
    l = -lp
    assert torch.isfinite(L).all() and torch.isfinite(v).all()
    assert (v >= -1e-12).all() and torch.allclose(v.sum(1), torch.ones(len(v), dtype=v.dtype))
    assert (_distance(divergence, y, v) <= gamma + 1e-6).all()
    assert (L <= (y * l).sum(1) + 1e-9).all() and (L >= l.min(1).values - 1e-9).all()
    # a larger budget never increases the loss
    L2 = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma * 2 + 0.01)
    assert (L2 <= L + 1e-7 * (1 + L.abs())).all()
    assert math.isfinite(float(L.sum()))
