"""The library's closed forms against independent references (tests/cicw/cvxpy_reference.py):
a generic convex solver (cvxpy) and naive float64 numpy closed forms, on many seeded random
batches. The reference module is checked on its own first (test_reference_*), so a failure in
the library tests points at the library."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import cicw

from .cvxpy_reference import (
    alpha_closed_form,
    alpha_instance_weights,
    alpha_kkt_residual,
    class_distance,
    class_inner,
    effective_lambda,
    kl_instance_weights,
    one_hot_closed_form,
    tv_instance_lp,
)

ALPHAS = (-1.0, 0.0, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0)
# Budgets per class divergence. TV and L1 saturate at 1 and 2 (every unit of mass moved); L2's
# largest distance between simplex points is 2.
GAMMAS = {
    "kl": (0.001, 0.01, 0.1, 0.5, 1.0, 2.0),
    "tv": (0.001, 0.01, 0.1, 0.5, 1.0),
    "l1": (0.001, 0.01, 0.1, 0.5, 1.0, 2.0),
    "l2": (0.001, 0.01, 0.1, 0.5, 1.0, 2.0),
}
LOGIT_SCALES = (0.1, 1.0, 5.0, 20.0)
TARGET_KINDS = ("index", "mixup", "sparse", "dense")


def _seed(*key: object) -> int:
    return zlib.crc32(repr(key).encode())  # stable across processes, unlike hash()


def _targets(kind: str, n: int, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """(targets as passed to the library, the same as [n, K] float64 rows)."""
    if kind == "index":
        idx = rng.integers(0, k, n)
        return torch.from_numpy(idx), np.eye(k)[idx]
    y = np.zeros((n, k))
    for i in range(n):
        if kind == "mixup":  # r y_a + (1-r) y_b: extreme ratios included, a == b gives support 1
            a, b = rng.integers(0, k, 2)
            r = rng.choice([rng.random(), rng.random() ** 6, 1e-6, 0.5])
            y[i, a] += r
            y[i, b] += 1 - r
        else:
            # sparse: support size 1, 2, K or anything between; dense: every class labelled
            size = k if kind == "dense" else int(rng.choice([1, 2, k, rng.integers(1, k + 1)]))
            support = rng.choice(k, size, replace=False)
            y[i, support] = rng.dirichlet(np.full(size, rng.choice([0.3, 1.0, 5.0])))
            y[i] = np.where(y[i] < 1e-12, 0.0, y[i])  # no subnormal shares: keep the solver sane
            y[i] /= y[i].sum()
    return torch.from_numpy(y), y


def _log_probs(n: int, k: int, scale: float, rng: np.random.Generator) -> torch.Tensor:
    return torch.log_softmax(torch.from_numpy(rng.standard_normal((n, k)) * scale), dim=-1)


def _check_class_solution(L: torch.Tensor, v: torch.Tensor, l: np.ndarray, y: np.ndarray,
                          divergence: str, gamma: float) -> None:
    Ln, vn = L.double().numpy(), v.double().numpy()
    assert np.isfinite(Ln).all() and np.isfinite(vn).all()
    assert (vn >= -1e-12).all(), vn.min()
    np.testing.assert_allclose(vn.sum(1), 1.0, atol=1e-9)
    dist = class_distance(divergence, y, vn)
    assert (dist <= gamma + 1e-5).all(), (dist, gamma)
    # the loss is the weights' loss (Danskin), up to 0 * inf for classes of probability 0
    np.testing.assert_allclose(Ln, np.where(vn > 0, vn * l, 0.0).sum(1), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the references


@pytest.mark.parametrize("divergence", ["kl", "tv", "l1"])
def test_reference_class_solver_reproduces_hard_bootstrapping(divergence: str) -> None:
    rng = np.random.default_rng(_seed("ref-boot", divergence))
    for k in (2, 10, 100):
        for gamma in GAMMAS[divergence]:
            l = -_log_probs(1, k, float(rng.choice(LOGIT_SCALES)), rng)[0].numpy()
            c = int(rng.integers(0, k))
            value, v = class_inner(l, np.eye(k)[c], divergence, gamma)
            assert value == pytest.approx(one_hot_closed_form(l, c, divergence, gamma), abs=1e-7, rel=1e-7)
            assert class_distance(divergence, np.eye(k)[c], v) <= gamma + 1e-7


def test_reference_l2_solver_on_two_classes() -> None:
    # K = 2, one-hot y = e_0, l_1 < l_0: v = (1 - a, a) with 2 a^2 <= gamma, so a = sqrt(gamma/2)
    for gamma in GAMMAS["l2"]:
        a = min(math.sqrt(gamma / 2), 1.0)
        value, _ = class_inner(np.array([3.0, 1.0]), np.array([1.0, 0.0]), "l2", gamma)
        assert value == pytest.approx(3.0 * (1 - a) + a, abs=1e-7)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_reference_alpha_closed_form_is_the_simplex_optimum_at_the_effective_lambda(alpha: float) -> None:
    # Independent of cicw: the normalised closed form is a KKT point of the simplex problem at
    # lambda' = effective_lambda, and cvxpy finds the same weights.
    rng = np.random.default_rng(_seed("ref-alpha", alpha))
    for lam in (0.3, 1.0, 3.0):
        l = rng.random(12) * 2
        l[:2] = rng.random(2) * lam / max(alpha - 1.0, 1.0)  # alpha > 1 keeps some examples
        w = alpha_closed_form(l, alpha, lam)
        lam_eff = effective_lambda(l, alpha, lam)
        assert alpha_kkt_residual(w, l, alpha, lam_eff) < 1e-9
        _, w_cvx = alpha_instance_weights(l, alpha, lam_eff)
        np.testing.assert_allclose(w_cvx, w, atol=1e-4)


def test_reference_kl_instance_solver_is_the_softmax() -> None:
    rng = np.random.default_rng(_seed("ref-kl-instance"))
    for lam in (0.1, 1.0, 10.0):
        l = rng.random(10) * 3
        np.testing.assert_allclose(kl_instance_weights(l, lam), alpha_closed_form(l, 1.0, lam), atol=1e-5)


# ----------------------------------------------------------------------------- class weights


@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("divergence", ["kl", "tv", "l1", "l2"])
def test_class_reweighted_loss_matches_cvxpy(k: int, kind: str, divergence: str) -> None:
    rng = np.random.default_rng(_seed("class", k, kind, divergence))
    n = 6 if k == 100 else 8
    for j, gamma in enumerate(GAMMAS[divergence]):
        scale = LOGIT_SCALES[(j + k) % len(LOGIT_SCALES)]
        lp = _log_probs(n, k, scale, rng)
        targets, y = _targets(kind, n, k, rng)
        L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
        l = -lp.numpy()
        _check_class_solution(L, v, l, y, divergence, gamma)
        for i in range(n):
            ref, _ = class_inner(l[i], y[i], divergence, gamma)
            assert abs(float(L[i]) - ref) <= 1e-4 * max(1.0, abs(ref)), (gamma, scale, i, float(L[i]), ref, y[i])
        # bounds every solution must meet: never above the plain loss, never below the best class
        assert (L.numpy() <= (y * l).sum(1) + 1e-9).all() and (L.numpy() >= l.min(1) - 1e-9).all()


@pytest.mark.parametrize("divergence", ["kl", "tv", "l1"])
def test_one_hot_losses_are_hard_bootstrapping(divergence: str) -> None:
    # Closed form from the notes on a large batch (cheap: no solver).
    rng = np.random.default_rng(_seed("boot", divergence))
    for k in (2, 10, 100):
        for gamma in GAMMAS[divergence] + (0.0, 5.0):
            lp = _log_probs(64, k, float(rng.choice(LOGIT_SCALES)), rng)
            idx = rng.integers(0, k, 64)
            for targets in (torch.from_numpy(idx), torch.from_numpy(np.eye(k)[idx])):  # index and soft form
                L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
                l = -lp.numpy()
                expected = [one_hot_closed_form(l[i], int(idx[i]), divergence, gamma) for i in range(64)]
                np.testing.assert_allclose(L.numpy(), expected, rtol=1e-9, atol=1e-9)
                _check_class_solution(L, v, l, np.eye(k)[idx], divergence, gamma)


@pytest.mark.parametrize("divergence", ["none", "kl", "tv", "l1", "l2"])
def test_zero_budget_and_none_keep_the_given_label(divergence: str) -> None:
    rng = np.random.default_rng(_seed("zero", divergence))
    for kind in TARGET_KINDS:
        lp = _log_probs(16, 10, 5.0, rng)
        targets, y = _targets(kind, 16, 10, rng)
        for gamma in (0.0, 0.5) if divergence == "none" else (0.0,):
            L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
            np.testing.assert_allclose(v.numpy(), y, atol=1e-12)
            np.testing.assert_allclose(L.numpy(), (y * -lp.numpy()).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence", ["kl", "tv", "l1", "l2"])
def test_float32_log_probs_agree_with_cvxpy(divergence: str) -> None:
    rng = np.random.default_rng(_seed("f32", divergence))
    k, n = 10, 8
    for kind in ("index", "mixup", "sparse"):
        gamma = float(rng.choice(GAMMAS[divergence]))
        lp = _log_probs(n, k, 3.0, rng).float()
        targets, y = _targets(kind, n, k, rng)
        if targets.is_floating_point():
            targets = targets.float()
            y = targets.double().numpy() / targets.double().numpy().sum(1, keepdims=True)
        L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
        assert L.dtype == torch.float32 and v.dtype == torch.float32
        l = -lp.double().numpy()
        assert (class_distance(divergence, y, v.double().numpy()) <= gamma + 1e-5).all()
        for i in range(n):
            ref, _ = class_inner(l[i], y[i], divergence, gamma)
            assert abs(float(L[i]) - ref) <= 1e-4 * max(1.0, abs(ref)), (kind, gamma, i, float(L[i]), ref)


def test_class_weights_with_a_certain_model() -> None:
    # Saturated predictions (probabilities 1 - 1e-30 and 1e-30-ish): losses near 0 and ~70.
    rng = np.random.default_rng(_seed("saturated"))
    k, n = 10, 8
    logits = rng.standard_normal((n, k)) * 0.1
    logits[np.arange(n), rng.integers(0, k, n)] += 70.0
    lp = torch.log_softmax(torch.from_numpy(logits), -1)
    for divergence in ("kl", "tv", "l1", "l2"):
        for kind in ("index", "mixup", "sparse"):
            targets, y = _targets(kind, n, k, rng)
            gamma = 0.01
            L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
            l = -lp.numpy()
            _check_class_solution(L, v, l, y, divergence, gamma)
            for i in range(n):
                ref, _ = class_inner(l[i], y[i], divergence, gamma)
                assert abs(float(L[i]) - ref) <= 1e-4 * max(1.0, abs(ref)), (divergence, kind, i, float(L[i]), ref)


# ----------------------------------------------------------------------------- instance weights


@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0, 5.0, 100.0])
def test_kl_instance_weights_match_cvxpy(lam: float) -> None:
    rng = np.random.default_rng(_seed("kl-instance", lam))
    for n in (1, 2, 5, 16, 64):
        for scale in (0.1, 2.0, 10.0):
            l = rng.random(n) * scale
            w = cicw.instance_weights(torch.from_numpy(l), alpha=1.0, lam=lam).numpy()
            np.testing.assert_allclose(w, kl_instance_weights(l, lam), atol=1e-4)
            np.testing.assert_allclose(w, alpha_closed_form(l, 1.0, lam), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_alpha_weights_are_the_closed_form_and_a_kkt_point(alpha: float, lam: float) -> None:
    rng = np.random.default_rng(_seed("alpha", alpha, lam))
    compared = 0
    for n in (1, 3, 20):
        for scale in (0.5, 2.0, 30.0):
            l = rng.random(n) * scale
            w = cicw.instance_weights(torch.from_numpy(l), alpha=alpha, lam=lam).numpy()
            if alpha > 1 and l.min() >= lam / (alpha - 1):  # every example zeroed: see the edge cases
                assert w[l == l.min()].sum() == pytest.approx(1.0, abs=1e-12)
                continue
            np.testing.assert_allclose(w, alpha_closed_form(l, alpha, lam), rtol=1e-6, atol=1e-12)
            compared += n > 1
            # exact simplex optimum for the batch's effective lambda (the contract for alpha != 1)
            lam_eff = effective_lambda(l, alpha, lam)
            assert alpha_kkt_residual(w, l, alpha, lam_eff) <= 1e-8 * (1.0 + l.max())
            if n <= 3 and scale <= 2.0:  # and a generic solver agrees (power cones: keep it small)
                _, w_cvx = alpha_instance_weights(l, alpha, lam_eff)
                np.testing.assert_allclose(w, w_cvx, atol=1e-4)
    assert compared >= 2


@pytest.mark.parametrize("radius", [0.0, 0.001, 0.05, 0.3, 0.5, 0.9, 1.0])
def test_tv_instance_weights_solve_the_lp(radius: float) -> None:
    rng = np.random.default_rng(_seed("tv", radius))
    for n in (1, 2, 3, 7, 16, 40):
        for ties in (False, True):
            l = rng.integers(0, 3, n).astype(np.float64) if ties else rng.random(n) * 3
            w = cicw.instance_weights(torch.from_numpy(l), divergence="tv", radius=radius).numpy()
            assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
            assert 0.5 * np.abs(w - 1 / n).sum() <= radius + 1e-12
            ref, _ = tv_instance_lp(l, radius)
            assert abs(w @ l - ref) <= 1e-4, (n, ties, w @ l, ref)
            assert w @ l <= ref + 1e-7  # the LP's exact optimum, not merely near it


# ----------------------------------------------------------------------------- edge cases


def _stable_alpha_reference(l: np.ndarray, alpha: float, lam: float) -> np.ndarray | None:
    """The closed form in the log domain (no under/overflow); None when alpha > 1 zeroes all."""
    if alpha == 1.0:
        logw = -l / lam
    else:
        base = (1.0 - alpha) * l + lam
        with np.errstate(divide="ignore"):
            logw = np.where(base > 0, np.log(np.where(base > 0, base, 1.0)) / (alpha - 1.0), -np.inf)
    if not np.isfinite(logw).any():
        return None
    w = np.exp(logw - logw.max())
    return w / w.sum()


EDGE_LOSSES = {
    "distinct": np.array([0.3, 1.7, 0.9, 2.5, 0.31]),
    "huge": np.array([1e4, 1e4 + 1.0, 2e4, 3e4, 1e4]),
    "with-zero": np.array([0.0, 1e-9, 50.0, 1e4]),
    "all-equal": np.full(16, 0.7),
    "one": np.array([5.0]),
    "tiny": np.array([1e-300, 3e-300, 0.0, 1e-12]),
}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("lam", [1e-6, 1.0, 1e3])
def test_instance_weight_edge_cases(alpha: float, lam: float) -> None:
    for name, l in EDGE_LOSSES.items():
        w = cicw.instance_weights(torch.from_numpy(l), alpha=alpha, lam=lam).numpy()
        assert np.isfinite(w).all() and (w >= 0).all(), (name, w)
        assert abs(w.sum() - 1.0) < 1e-12, (name, w)
        smallest = l == l.min()
        ref = _stable_alpha_reference(l, alpha, lam)
        if ref is None:  # alpha > 1 with every loss past lam/(alpha-1): mass on the smallest losses
            assert alpha > 1 and lam / (alpha - 1) <= l.min()
            assert w[~smallest].sum() == 0.0, (name, w)
        else:
            np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-12, err_msg=name)
        if name in ("all-equal", "one"):
            np.testing.assert_allclose(w, np.full(len(l), 1 / len(l)), rtol=1e-12)
        if lam == 1e-6 and alpha >= 1 and name in ("distinct", "huge"):
            # KL and alpha > 1 concentrate on the smallest loss as lambda -> 0
            assert w[smallest].sum() > 1 - 1e-6, (name, w)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0])
def test_alpha_above_one_with_every_loss_past_the_threshold(alpha: float) -> None:
    lam = 0.1  # threshold lam/(alpha-1) <= 0.2; every loss below is past it
    for l, smallest in (([5.0, 3.0, 3.0, 9.0], [1, 2]), ([0.5], [0]), ([7.0, 0.3, 1e4], [1])):
        w = cicw.instance_weights(torch.tensor(l, dtype=torch.float64), alpha=alpha, lam=lam)
        assert torch.isfinite(w).all() and (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
        off = [i for i in range(len(l)) if i not in smallest]
        assert float(w[off].sum()) == 0.0, w
    # one loss just inside the threshold takes everything (the closed form itself)
    w = cicw.instance_weights(torch.tensor([5.0, 0.01, 9.0], dtype=torch.float64), alpha=2.0, lam=0.1)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float32_losses_give_float32_weights_matching_float64(alpha: float) -> None:
    rng = np.random.default_rng(_seed("f32-instance", alpha))
    l = rng.random(32) * 3
    w32 = cicw.instance_weights(torch.from_numpy(l).float(), alpha=alpha, lam=0.5)
    assert w32.dtype == torch.float32
    ref = alpha_closed_form(l.astype(np.float32).astype(np.float64), alpha, 0.5)
    np.testing.assert_allclose(w32.double().numpy(), ref, rtol=1e-5, atol=1e-7)
