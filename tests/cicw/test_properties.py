"""Property tests (hypothesis): whatever the finite input, instance weights stay on the simplex,
class weights stay on the simplex and inside the divergence ball, and the inner loss stays between
the best class's loss and the plain loss. Agreement with a solver is in test_reference_agreement.py."""

from __future__ import annotations

import itertools

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cicw

# Non-negative finite losses across every scale a float64 batch can hold in practice: exact
# zeros, subnormals, tiny, ordinary cross entropies, huge. (Above ~1e300 see test_extreme_inputs.py.)
loss_values = st.one_of(
    st.just(0.0),
    st.floats(0.0, 1e-300, allow_subnormal=True),
    st.floats(0.0, 20.0),
    st.floats(0.0, 1e4),
    st.floats(1e4, 1e300),
)
loss_lists = st.lists(loss_values, min_size=1, max_size=40)
alphas = st.one_of(st.sampled_from([-2.0, -1.0, 0.0, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]), st.floats(-2.0, 4.0))
lams = st.one_of(st.sampled_from([1e-6, 1e3]), st.floats(1e-6, 1e3))


def _assert_on_simplex(w: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(w).all(), w
    assert (w >= 0).all(), w
    assert abs(float(w.double().sum()) - 1.0) <= tol, float(w.double().sum())


def _assert_non_increasing_in_loss(w: torch.Tensor, losses: torch.Tensor, *, ties_share: bool) -> None:
    # Higher weight = more trusted: a strictly smaller loss never gets a smaller weight. The
    # closed forms give tied losses equal weights; the TV LP may break ties either way.
    w, l = w.double(), losses.double()
    smaller = l[:, None] < l[None, :]
    assert (w[:, None] >= w[None, :] * (1 - 1e-9) - 1e-300)[smaller].all(), (l, w)
    if ties_share:
        tied = l[:, None] == l[None, :]
        assert torch.isclose(w[:, None].expand_as(tied), w[None, :].expand_as(tied), rtol=1e-9, atol=0.0)[tied].all()


@settings(max_examples=300, deadline=None)
@given(losses=loss_lists, alpha=alphas, lam=lams)
@example(losses=[1e4, 2e4, 3.0], alpha=1.0, lam=1e-6)
@example(losses=[5.0, 3.0, 3.0, 9.0], alpha=2.0, lam=1e-6)  # all past alpha > 1's threshold
@example(losses=[0.7] * 8, alpha=3.0, lam=1e-6)
@example(losses=[1e300, 0.0], alpha=-2.0, lam=1e-6)
def test_instance_weights_on_simplex_and_monotone(losses: list[float], alpha: float, lam: float) -> None:
    t = torch.tensor(losses, dtype=torch.float64)
    w = cicw.instance_weights(t, alpha=alpha, lam=lam)
    assert w.dtype == torch.float64 and w.shape == t.shape
    _assert_on_simplex(w, 1e-9)
    _assert_non_increasing_in_loss(w, t, ties_share=True)
    if alpha > 1 and float(t.min()) >= lam / (alpha - 1):  # all past the threshold
        assert abs(float(w[t == t.min()].sum()) - 1.0) < 1e-12


@settings(max_examples=100, deadline=None)
@given(losses=st.lists(st.floats(0.0, float(torch.finfo(torch.float32).max), width=32), min_size=1, max_size=40),
       alpha=alphas, lam=lams)
def test_float32_instance_weights_on_simplex(losses: list[float], alpha: float, lam: float) -> None:
    w = cicw.instance_weights(torch.tensor(losses, dtype=torch.float32), alpha=alpha, lam=lam)
    assert w.dtype == torch.float32
    _assert_on_simplex(w, 1e-5)


@settings(max_examples=150, deadline=None)
@given(losses=loss_lists, radius=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
def test_tv_instance_weights_in_ball(losses: list[float], radius: float) -> None:
    t = torch.tensor(losses, dtype=torch.float64)
    w = cicw.instance_weights(t, divergence="tv", radius=radius)
    n = len(losses)
    _assert_on_simplex(w, 1e-12)
    assert 0.5 * float((w - 1 / n).abs().sum()) <= radius + 1e-12
    _assert_non_increasing_in_loss(w, t, ties_share=False)
    # never worse than uniform, and at least as good as any smaller budget
    assert float(w @ t) <= float(t.mean()) * (1 + 1e-12)
    w_half = cicw.instance_weights(t, divergence="tv", radius=radius / 2)
    assert float(w @ t) <= float(w_half @ t) * (1 + 1e-12)


# ----------------------------------------------------------------------------- class weights


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_probs [n, K], targets as passed, targets as [n, K] float64 rows)."""
    n = draw(st.integers(1, 6))
    k = draw(st.sampled_from([2, 3, 5, 10, 100]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5.0, 30.0, 300.0]))
    # Only the seeded generator, never a global RNG, so hypothesis can replay a failure.
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * scale, -1)
    kind = draw(st.sampled_from(["index", "one-hot rows", "mixup", "soft"]))
    if kind in ("index", "one-hot rows"):
        idx = torch.randint(0, k, (n,), generator=g)
        y = torch.nn.functional.one_hot(idx, k).double()
        return lp, (idx if kind == "index" else y), y
    if kind == "mixup":
        a, b = torch.randint(0, k, (2, n), generator=g)
        r = draw(st.sampled_from([1e-6, 0.01, 0.5, 0.99, 1 - 1e-6]))
        y = r * torch.nn.functional.one_hot(a, k).double() + (1 - r) * torch.nn.functional.one_hot(b, k).double()
        return lp, y, y
    # exp(sigma z) normalised: near uniform for small sigma, near one-hot for large; then a
    # random mask (never the largest entry) gives supports from 1 to K.
    y = torch.exp(draw(st.floats(0.0, 8.0)) * torch.randn(n, k, generator=g, dtype=torch.float64))
    y = y / y.sum(1, keepdim=True)
    mask = torch.rand(n, k, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    mask[torch.arange(n), y.argmax(1)] = False
    y = torch.where(mask, torch.zeros_like(y), y)
    y = y / y.sum(1, keepdim=True)
    return lp, y, y


def _distance(divergence: str, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if divergence == "none":
        return (v - y).abs().sum(1)
    if divergence == "kl":
        terms = torch.where(y > 0, y * (torch.log(y.clamp_min(1e-300)) - torch.log(v)), torch.zeros_like(y))
        return terms.sum(1)  # +inf if v leaves y's support
    if divergence == "tv":
        return 0.5 * (v - y).abs().sum(1)
    if divergence == "l1":
        return (v - y).abs().sum(1)
    return ((v - y) ** 2).sum(1)


gammas = st.one_of(st.sampled_from([0.0, 1e-12, 1e-3, 0.01, 0.5, 1.0, 2.0]), st.floats(0.0, 3.0))


@settings(max_examples=250, deadline=None)
@given(batch=batches(), divergence=st.sampled_from(["none", "kl", "tv", "l1", "l2"]), gamma=gammas)
def test_class_weights_on_simplex_in_ball_and_between_bounds(batch, divergence: str, gamma: float) -> None:  # type: ignore[no-untyped-def]
    lp, targets, y = batch
    L, v = cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma, return_weights=True)
    l = -lp
    assert L.shape == (len(lp),) and v.shape == lp.shape
    assert torch.isfinite(L).all() and torch.isfinite(v).all()
    assert (v >= -1e-12).all()
    assert torch.allclose(v.sum(1), torch.ones(len(v), dtype=v.dtype), atol=1e-9, rtol=0)
    radius = 0.0 if divergence == "none" else gamma
    dist = _distance(divergence, y, v)
    assert (dist <= radius + 1e-6).all(), (dist, radius)
    plain, best = (y * l).sum(1), l.min(1).values
    tol = 1e-9 * (1 + plain.abs())
    assert (plain + tol >= L).all() and (best - tol <= L).all(), (L, plain, best)
    torch.testing.assert_close(L, torch.where(v > 0, v * l, torch.zeros_like(l)).sum(1), rtol=1e-9, atol=1e-12)
    # the loss does not depend on asking for the weights
    torch.testing.assert_close(cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=gamma), L,
                               rtol=0, atol=0)


@settings(max_examples=150, deadline=None)
@given(batch=batches(), divergence=st.sampled_from(["kl", "tv", "l1", "l2"]),
       budgets=st.lists(gammas, min_size=2, max_size=4))
def test_larger_budget_never_increases_the_loss(batch, divergence: str, budgets: list[float]) -> None:  # type: ignore[no-untyped-def]
    lp, targets, _ = batch
    losses = [cicw.class_reweighted_loss(lp, targets, divergence=divergence, gamma=g) for g in sorted(budgets)]
    for smaller, larger in itertools.pairwise(losses):
        assert (larger <= smaller + 1e-7 * (1 + smaller.abs())).all(), (sorted(budgets), smaller, larger)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), divergence=st.sampled_from(["kl", "tv", "l1", "l2"]), gamma=gammas)
def test_float32_class_weights_on_simplex(batch, divergence: str, gamma: float) -> None:  # type: ignore[no-untyped-def]
    lp, targets, y = batch
    lp32 = lp.float()
    targets32 = targets.float() if targets.is_floating_point() else targets
    L, v = cicw.class_reweighted_loss(lp32, targets32, divergence=divergence, gamma=gamma, return_weights=True)
    assert L.dtype == torch.float32 and v.dtype == torch.float32
    assert torch.isfinite(L).all() and torch.isfinite(v).all() and (v >= 0).all()
    assert torch.allclose(v.double().sum(1), torch.ones(len(v), dtype=torch.float64), atol=1e-5, rtol=0)
    y32 = targets32.double() if targets32.is_floating_point() else y
    y32 = y32 / y32.sum(1, keepdim=True)
    # A class weight below float32's range rounds to 0 (a 1e-6 mixup share under a small KL
    # budget may keep e^-1000 of it): measure with such weights at the smallest float32 instead.
    v_measured = v.double().clamp_min(float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23)
    assert (_distance(divergence, y32, torch.where(y32 > 0, v_measured, v.double())) <= gamma + 1e-4).all()
    l = -lp32.double()
    tol = 1e-5 * (1 + l.abs().amax(1))
    assert (L.double() <= (y32 * l).sum(1) + tol).all() and (L.double() >= l.min(1).values - tol).all()

