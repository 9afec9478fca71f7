"""class_reweighted_loss: closed forms, edge cases, regressions (the cvxpy comparison is in
test_reference_agreement.py)."""

from __future__ import annotations

import math

import pytest
import torch

import cicw


def _kl(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(y > 0, y * torch.log(y / v.clamp_min(1e-300)), torch.zeros_like(y)).sum(-1)


def test_one_hot_kl_closed_form_is_hard_bootstrapping() -> None:
    lp = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.5]], dtype=torch.float64), -1)
    y = torch.tensor([1, 1])
    gamma = 0.3
    L = cicw.class_reweighted_loss(lp, y, divergence="kl", gamma=gamma)
    l = -lp
    beta = math.exp(-gamma)
    expected0 = beta * l[0, 1] + (1 - beta) * l[0].min()
    torch.testing.assert_close(L, torch.stack([expected0, l[1, 1]]))  # row 1 agrees with the model


def test_tv_and_l1_conventions_differ_by_half() -> None:
    lp = torch.log_softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    y = torch.randint(0, 5, (6,))
    tv = cicw.class_reweighted_loss(lp, y, divergence="tv", gamma=0.2)
    l1 = cicw.class_reweighted_loss(lp, y, divergence="l1", gamma=0.4)
    torch.testing.assert_close(tv, l1)


def test_tiny_target_mass_under_kl_is_finite() -> None:
    # Regression: a mixup target with a 1e-6 share put the KL root at s ~ e^-10000 (NaN before).
    l = torch.tensor([[9.2322, 8.8076, 8.4350, 8.2213, 7.9279, 9.5761, 8.6785, 7.6896, 9.2084, 1.8932e-03]])
    y = torch.zeros(1, 10)
    y[0, 0], y[0, 9] = 9.6526e-07, 1.0 - 9.6526e-07
    L, v = cicw.class_reweighted_loss(-l, y, divergence="kl", gamma=0.01, return_weights=True)
    assert torch.isfinite(L).all() and torch.isfinite(v).all()
    assert float(L) == pytest.approx(1.8932e-03, abs=1e-4)
    assert float(_kl(y.double(), v.double())) <= 0.01 + 1e-6


def test_partner_share_below_float64_resolution_under_kl() -> None:
    # Regression: a 1e-20 share on the low-loss class normalised the other to exactly 1, and the
    # two-class Newton returned NaN weights (and a loss of 0). The optimum keeps e^-gamma on it.
    lp = torch.log_softmax(torch.tensor([[-9.0, 0.0, -11.0]], dtype=torch.float64), -1)
    y = torch.tensor([[1.0, 1e-20, 0.0]], dtype=torch.float64)
    L, v = cicw.class_reweighted_loss(lp, y, divergence="kl", gamma=1e-3, return_weights=True)
    assert torch.isfinite(v).all()
    assert float(v[0, 0]) == pytest.approx(math.exp(-1e-3), rel=1e-9)
    assert float(L) == pytest.approx(float(-(v * lp).sum()), rel=1e-12)


@pytest.mark.parametrize("divergence", ["kl", "tv", "l1", "l2"])
def test_soft_rows_stay_on_simplex_and_in_ball(divergence: str) -> None:
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(64, 7, generator=g, dtype=torch.float64) * 4, -1)
    r = torch.rand(64, 1, generator=g, dtype=torch.float64) ** 8  # includes extreme mixing ratios
    a, b = torch.randint(0, 7, (2, 64), generator=g)
    y = r * torch.nn.functional.one_hot(a, 7) + (1 - r) * torch.nn.functional.one_hot(b, 7)
    gamma = 0.1
    L, v = cicw.class_reweighted_loss(lp, y, divergence=divergence, gamma=gamma, return_weights=True)
    assert torch.isfinite(L).all()
    assert (v >= -1e-12).all()
    torch.testing.assert_close(v.sum(1), torch.ones(64, dtype=torch.float64))
    dist = {"kl": _kl(y, v), "tv": 0.5 * (v - y).abs().sum(1), "l1": (v - y).abs().sum(1),
            "l2": ((v - y) ** 2).sum(1)}[divergence]
    assert (dist <= gamma + 1e-6).all()
    l = -lp
    assert ((y * l).sum(1) + 1e-9 >= L).all() and (l.min(1).values - 1e-9 <= L).all()


def test_gradient_flows_through_log_probs_only() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    L, v = cicw.class_reweighted_loss(torch.log_softmax(logits, -1), y, gamma=0.5, return_weights=True)
    L.sum().backward()
    assert not v.requires_grad
    manual = torch.autograd.functional.jacobian(
        lambda z: -(v * torch.log_softmax(z, -1)).sum(), logits.detach())
    torch.testing.assert_close(logits.grad, manual)


def test_argument_errors_name_the_problem() -> None:
    lp = torch.log_softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match="divergence must be one of"):
        cicw.class_reweighted_loss(lp, torch.tensor([0, 1, 2]), divergence="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma"):
        cicw.class_reweighted_loss(lp, torch.tensor([0, 1, 2]), gamma=-1.0)
    with pytest.raises(ValueError, match="rows"):
        cicw.class_reweighted_loss(lp, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        cicw.class_reweighted_loss(lp, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        cicw.class_reweighted_loss(lp, torch.full((3, 5), 0.2))
    with pytest.raises(ValueError, match="log_probs"):
        cicw.class_reweighted_loss(torch.zeros(3), torch.tensor([0, 1, 2]))


def _kl_stay_by_bisection(l: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reference for 'all mass stays on the support': v ∝ y / (l - min l + s), KL(y||v) = gamma
    found by 200 bisection steps on log s. Valid when no class off the support beats it."""
    d = l - torch.where(y > 0, l, torch.inf).amin(1, keepdim=True)
    d = torch.where(y > 0, d, torch.zeros_like(d))
    lo = torch.full((len(l), 1), -700.0, dtype=torch.float64)
    hi = torch.full_like(lo, 50.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        q = y / (d + torch.exp(mid))
        v = q / q.sum(1, keepdim=True)
        too_far = _kl(y, v).unsqueeze(1) > gamma
        lo, hi = torch.where(too_far, mid, lo), torch.where(too_far, hi, mid)
    q = y / (d + torch.exp(hi))
    return q / q.sum(1, keepdim=True)


@pytest.mark.parametrize("gamma", [1e-4, 0.01, 0.5, 3.0])
def test_kl_extreme_shares_on_wide_support(gamma: float) -> None:
    # Three labelled classes with shares down to 1e-60: the general Newton path starts in a
    # plateau where KL is below float64 resolution and must still find the root.
    g = torch.Generator().manual_seed(3)
    n, k = 300, 5
    shares = 10.0 ** (-60 * torch.rand(n, 2, generator=g, dtype=torch.float64))
    y = torch.zeros(n, k, dtype=torch.float64)
    y[:, 0], y[:, 1] = shares[:, 0], shares[:, 1]
    y[:, 2] = 1 - y[:, 0] - y[:, 1]
    y = y / y.sum(1, keepdim=True)
    l = torch.rand(n, k, generator=g, dtype=torch.float64) * 8
    l[:, 3:] = 20.0  # classes off the support are worse, so no mass leaks there
    L, v = cicw.class_reweighted_loss(-l, y, divergence="kl", gamma=gamma, return_weights=True)
    expected = (_kl_stay_by_bisection(l, y, gamma) * l).sum(1)
    torch.testing.assert_close(L, expected, atol=1e-7, rtol=1e-9)
    assert (_kl(y, v) <= gamma + 1e-9).all()


def test_l2_with_huge_step_keeps_projection_defined() -> None:
    # Regression (found by hypothesis): nearly equal losses make the bisection's t huge, and
    # u_0 - (u_0 - 1) rounded to 0 left the projection with no active index.
    lp = torch.tensor([[-0.6933, -0.6930]], dtype=torch.float64)
    for gamma in (0.0, 0.3, 2.0):
        L, v = cicw.class_reweighted_loss(lp, torch.tensor([0]), divergence="l2", gamma=gamma,
                                          return_weights=True)
        assert torch.isfinite(L).all() and float(((v - torch.tensor([[1.0, 0.0]])) ** 2).sum()) <= gamma + 1e-9


def test_kl_two_class_tiny_gamma_stays_feasible() -> None:
    # Regression (found by hypothesis): gamma ~ 1e-183 started Newton exactly at KL's minimum.
    lp = torch.tensor([[-2.8094, -0.0621]], dtype=torch.float64)
    y = torch.tensor([[0.4606, 0.5394]], dtype=torch.float64)
    L, v = cicw.class_reweighted_loss(lp, y, divergence="kl", gamma=5.857e-183, return_weights=True)
    assert float(_kl(y, v)) <= 1e-12
    torch.testing.assert_close(L, (y * -lp).sum(1))


def test_kl_two_class_high_mass_numpy_twin_matches_torch() -> None:
    # The CPU fast path solves the two-class case in NumPy; the general path (and CUDA) in torch.
    # Rounding differs (fused addcmul): agreement well inside the 3 steps' 6e-10 on p.
    from cicw.class_weights import _kl_two_class_high_mass, _kl_two_class_high_mass_np

    y_hi = torch.cat([torch.tensor([0.0, 1e-300, 1.0 - 2.0**-53, 1.0]),
                      10.0 ** -torch.linspace(0.0, 16.0, 97, dtype=torch.float64)])
    for gamma in (1e-14, 1e-8, 1e-3, 0.01, 0.5, 3.0):
        expected = _kl_two_class_high_mass(y_hi.clone(), gamma)
        got = torch.from_numpy(_kl_two_class_high_mass_np(y_hi.numpy().copy(), gamma))
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
