"""Class weights (the C in CICW): the inner minimisation over label distributions near the given one."""

from __future__ import annotations

import math
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from .simplex import project_rows_to_simplex
from .validation import check_choice, check_finite_number, check_targets

ClassDivergence = Literal["none", "kl", "tv", "l1", "l2"]
CLASS_DIVERGENCES = ("none", "kl", "tv", "l1", "l2")

# Fixed iteration counts keep the solvers free of host synchronisation. KL: safeguarded Newton
# on log(s) from the large-s starting point. Against a 200-step bisection on random rows
# (K = 2..100, Dirichlet targets, three labelled classes with shares down to 1e-60, gamma
# 1e-4..5), 16 steps leave at most 1e-7 on the loss; 20 for margin. Two labelled classes (every
# mixup target) take the cheaper exact path of _kl_two_class instead.
# L2: bisection on log(t) over a 60-unit bracket; 2^-48 * 60 is far below the 1e-4 agreement
# we promise on the loss.
_KL_NEWTON_STEPS = 20
# Two labelled classes: monotone Newton on a convex function. From the start in
# _kl_two_class_high_mass, 3 steps leave at most 6e-10 on the weight p against 6 steps for
# shares 1e-16..1 and gamma 1e-14..3 (so < 1e-6 on the loss for loss gaps up to 1000); 2 leave
# 5e-5.
_KL_TWO_CLASS_NEWTON_STEPS = 3
_KL_TWO_CLASS_LOG_P_LIMIT = 700.0
_LOG_ONE_MINUS_EPS = math.log1p(-2.0**-52)
_L2_BISECTION_STEPS = 48
# |log s| bound for the KL solver. A labelled class with tiny target mass (a mixup partner's
# 1e-6 share) can put the root at s ~ e^-10000, where exp underflows and y/s^2 overflows; at
# s = e^-300 that class's weight is already below 1e-130 and y/s^2 stays finite in float64.
_KL_LOG_S_LIMIT = 300.0
# Below this budget KL(y || v) cannot be told from gamma in float64 (KL is a difference of
# nearly equal sums), and v = y is within sqrt(gamma) * (loss gap) < 1e-6 of the optimum.
_KL_GAMMA_RESOLUTION = 1e-14


@overload
def class_reweighted_loss(log_probs: Tensor, targets: Tensor, *, divergence: ClassDivergence = ...,
                          gamma: float = ..., return_weights: Literal[False] = ...,
                          validate_args: bool = ...) -> Tensor: ...
@overload
def class_reweighted_loss(log_probs: Tensor, targets: Tensor, *, divergence: ClassDivergence = ...,
                          gamma: float = ..., return_weights: Literal[True],
                          validate_args: bool = ...) -> tuple[Tensor, Tensor]: ...


def class_reweighted_loss(
    log_probs: Tensor,
    targets: Tensor,
    *,
    divergence: ClassDivergence = "kl",
    gamma: float = 0.01,
    return_weights: bool = False,
    validate_args: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Per-example loss under the most favourable label distribution near the given one.

    With :math:`\ell_{ik} = -\log p(k \mid x_i)` and given label :math:`y_i` (one-hot or soft),

    .. math:: L_i = \min_{v \in \Delta_K,\ D(y_i, v) \le \gamma} \sum_k v_k \ell_{ik}

    ``divergence``: ``"none"`` (v = y, plain cross entropy), ``"kl"`` (KL(y || v) <= gamma),
    ``"tv"`` (0.5 * sum|v - y| <= gamma), ``"l1"`` (sum|v - y| <= gamma, the reference code's
    convention: half as much mass moves as with "tv"), ``"l2"`` (sum (v - y)^2 <= gamma).

    Exact solutions, on the tensors' device, without host synchronisation:

    - one-hot, KL: :math:`L = e^{-\gamma}\ell_c + (1-e^{-\gamma})\min_k \ell_k`; TV:
      :math:`(1-\gamma)\ell_c + \gamma \min_k \ell_k` (hard bootstrapping).
    - soft, KL: mass leaves the support S when the best class outside it beats every class in
      it (closed form), otherwise :math:`v_k \propto y_k/(\ell_k+\mu)` with mu found by a
      safeguarded Newton iteration so that KL(y || v) = gamma.
    - soft, TV/L1: a greedy LP (mass from the highest-loss labelled classes to the best class).
    - L2: :math:`v(t) = \Pi_\Delta(y - t\ell)` with the largest t inside the ball (bisection).

    The class weights v are constants for the gradient (Danskin): gradients flow through
    ``log_probs`` only. ``v`` moves mass towards classes the model finds likely, so a wrong
    label costs less; gamma bounds how far.

    Shape:
        log_probs: [n, K] log-probabilities (e.g. ``log_softmax(logits)``).
        targets: [n] class indices, or [n, K] rows on the simplex.
        returns: [n] losses (float32 or wider), and [n, K] class weights if ``return_weights``.

    Example:
        >>> lp = torch.log_softmax(torch.tensor([[4.0, 0.0, 0.0]]), dim=-1)
        >>> L, v = class_reweighted_loss(lp, torch.tensor([1]), gamma=0.5, return_weights=True)
        >>> [round(x, 3) for x in v[0].tolist()]
        [0.393, 0.607, 0.0]
    """
    check_choice("divergence", divergence, CLASS_DIVERGENCES)
    check_finite_number("gamma", gamma, minimum=0.0)
    if log_probs.dim() != 2 or not log_probs.dtype.is_floating_point:
        raise ValueError(f"log_probs must be a floating [n, K] tensor, got shape "
                         f"{tuple(log_probs.shape)} and dtype {log_probs.dtype}")
    n, k = log_probs.shape
    if k < 1:
        raise ValueError("log_probs needs at least one class")
    hard = check_targets(targets, n, k, check_values=validate_args)
    if validate_args and log_probs.numel() and bool(torch.isnan(log_probs).any()):
            raise ValueError("log_probs must not contain NaN")

    inner, v, _ = inner_losses(log_probs, targets, hard=hard, divergence=divergence, gamma=gamma,
                               need_weights=return_weights)
    return (inner, v) if return_weights else inner  # type: ignore[return-value]


def inner_losses(log_probs: Tensor, targets: Tensor, *, hard: bool, divergence: str, gamma: float,
                 need_weights: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Inner losses [n], class weights [n, K] (None unless ``need_weights`` and cheaper without),
    and the label mass moved, 0.5*|v - y|_1 [n] (detached), for valid inputs."""
    log_probs = log_probs if log_probs.dtype in (torch.float32, torch.float64) else log_probs.float()
    k = log_probs.shape[1]
    if hard and (divergence in ("none", "kl", "tv", "l1") or k == 1):
        # Closed forms as two gathers: no dense v, and a backward of two scatters.
        t = targets.long().unsqueeze(1)
        given = -log_probs.gather(1, t).squeeze(1)
        moved_mass = 0.0 if divergence == "none" or k == 1 else _hard_moved_mass(divergence, gamma)
        if moved_mass == 0.0:
            inner, best_differs, best = given, torch.zeros_like(given), t
        else:
            best = log_probs.detach().argmax(1, keepdim=True)
            inner = (1.0 - moved_mass) * given - moved_mass * log_probs.gather(1, best).squeeze(1)
            best_differs = (best != t).squeeze(1).to(given.dtype)
        v = None
        if need_weights:
            v = (1.0 - moved_mass) * torch.zeros_like(log_probs).scatter_(1, t, 1.0)
            v.scatter_add_(1, best, torch.full_like(given, moved_mass).unsqueeze(1))
        return inner, v, moved_mass * best_differs
    if divergence == "kl" and not hard:
        few = _kl_few_labels(log_probs, targets.to(log_probs.dtype), gamma, need_weights)
        if few is not None:
            return few
    losses = -log_probs
    with torch.no_grad():
        y = (torch.zeros_like(losses).scatter_(1, targets.long().unsqueeze(1), 1.0) if hard
             else targets.to(losses.dtype))
        v = _dense_class_weights(losses.detach(), y, divergence=divergence, gamma=gamma)
        moved = 0.5 * (v - y).abs().sum(1)
    # where() keeps 0 * inf (a class with probability exactly 0 and weight 0) out of the sum.
    inner = torch.where(v > 0, v * losses, torch.zeros_like(losses)).sum(-1)
    return inner, v, moved


def _hard_moved_mass(divergence: str, gamma: float) -> float:
    """Mass the given one-hot label loses to the likeliest class: KL(y||v) <= gamma means
    v_c >= e^-gamma; TV 0.5*|v-y|_1 <= gamma means v_c >= 1 - gamma; L1 is TV with gamma/2."""
    return {"kl": -math.expm1(-gamma), "tv": min(gamma, 1.0), "l1": min(gamma / 2, 1.0)}[divergence]


def _dense_class_weights(losses: Tensor, y: Tensor, *, divergence: str, gamma: float) -> Tensor:
    """The optimal v for valid dense targets y. losses, y [n, K] (no grad) -> [n, K]."""
    if divergence == "none" or y.shape[1] == 1:
        return y
    if divergence == "kl":
        return _soft_kl_weights(losses, y, gamma)
    if divergence in ("tv", "l1"):
        return _soft_tv_weights(losses, y, min(gamma if divergence == "tv" else gamma / 2, 1.0))
    return _l2_weights(losses, y, gamma)


def _soft_tv_weights(l: Tensor, y: Tensor, budget: float) -> Tensor:
    # Greedy LP: take up to y_k from the classes in descending loss order, give it to the last
    # (a lowest-loss class), which keeps its own mass.
    order = torch.argsort(l, dim=1, descending=True)
    ys = y.gather(1, order)
    capacity = ys.clone()
    capacity[:, -1] = 0.0
    before = torch.cumsum(capacity, dim=1) - capacity
    taken = torch.minimum((budget - before).clamp_min(0.0), capacity)
    vs = ys - taken
    vs[:, -1] += taken.sum(1)
    return torch.empty_like(y).scatter_(1, order, vs)


def _soft_kl_weights(l: Tensor, y: Tensor, gamma: float) -> Tensor:
    """v for KL; l, y [n, K] of one floating dtype -> [n, K] of that dtype."""
    support = y > 0
    n, k = y.shape
    if l.device.type == "cpu" and k > 2 and n:
        # On the CPU reading the widest support costs no device synchronisation, and mixup
        # targets have at most two labelled classes: solve on those columns only.
        width = int(support.sum(1).max())
        y_cols, cols = torch.topk(y, width, dim=1) if width < k else (y, None)
    else:
        y_cols, cols = y, None
    l64 = l.to(torch.float64)
    # Rows are validated to sum to 1 within 1e-4; KL(s) below assumes exactly 1, and at small
    # gamma a 1e-7 error in the sum already moves KL by a percent.
    y_cols = y_cols.to(torch.float64)
    y_cols = y_cols / y_cols.sum(1, keepdim=True)
    in_min = l64.masked_fill(~support, torch.inf).amin(1)
    out_min, out_arg = l64.masked_fill(support, torch.inf).min(1)  # inf when the support is every class
    l_cols = l64 if cols is None else l64.gather(1, cols)
    v_cols, leaked = _kl_on_support(l_cols, y_cols, in_min, out_min, gamma)
    v = v_cols if cols is None else torch.zeros_like(l64).scatter_(1, cols, v_cols)
    return v.scatter_add_(1, out_arg.unsqueeze(1), leaked.unsqueeze(1)).to(l.dtype)


def _kl_few_labels(log_probs: Tensor, y: Tensor, gamma: float,
                   need_weights: bool) -> tuple[Tensor, Tensor | None, Tensor] | None:
    """inner_losses for soft KL targets y [n, K] on the CPU when no row has more than two labelled
    classes (mixup targets), else None. The solve, the loss and the moved mass use the two
    labelled columns and the best unlabelled class: three gathered columns."""
    n, k = log_probs.shape
    if log_probs.device.type != "cpu" or k <= 2 or not n:
        return None
    # The weights are constants of the loss (Danskin), so on the CPU everything but the final
    # gather and sum runs in NumPy on zero-copy views: at n ~ 100 a NumPy op costs well under
    # torch's ~2 us dispatch, and the choice of columns and the solve are ~30 such ops. On
    # CUDA this would cost device round trips: that path never gets here.
    y_np = y.detach().numpy()
    labelled = y_np != 0
    if int(np.count_nonzero(labelled, axis=1).max()) > 2:
        return None
    # First and last labelled column: the same one for a row with one labelled class, whose
    # second copy then gets share 0 and weight 0.
    first = labelled.argmax(1)
    last = (k - 1) - labelled[:, ::-1].argmax(1)
    lp_np = log_probs.detach().numpy()
    out_arg = np.where(labelled, -np.inf, lp_np).argmax(1)
    idx = np.stack([first, last, out_arg], 1)
    rows = np.arange(n)
    y2 = np.stack([y_np[rows, first], np.where(first == last, 0.0, y_np[rows, last])], 1)
    w, moved = _kl_two_labelled(lp_np[rows[:, None], idx], y2, gamma)
    np_dtype = lp_np.dtype
    w_t = torch.from_numpy(w.astype(np_dtype))
    idx_t = torch.from_numpy(idx)
    lp3 = log_probs.gather(1, idx_t)
    # nansum keeps 0 * -inf (a class with probability exactly 0 and weight 0) out of the sum.
    inner = torch.nansum(w_t * lp3, 1).neg_()
    v = torch.zeros_like(log_probs).scatter_add_(1, idx_t, w_t) if need_weights else None
    return inner, v, torch.from_numpy(moved.astype(np_dtype))


def _kl_two_labelled(lp3: np.ndarray, y2: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """_kl_on_support in NumPy for rows with one or two labelled classes. lp3 [n, 3]:
    log-probabilities of the two labelled columns (the second a copy of the first if only one is
    labelled) and of the best unlabelled class; y2 [n, 2]: the two shares (the copy's 0). Returns
    float64 weights on those three columns [n, 3] and the moved mass 0.5 |v - y|_1 [n]."""
    # float64 is needed for KL near gamma (see below).
    lp3 = lp3.astype(np.float64)
    y2 = y2.astype(np.float64)
    y2 /= y2.sum(1, keepdims=True)  # rows sum to 1 within 1e-4 only: see _soft_kl_weights
    lp2 = lp3[:, :2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Case A (mass leaks to the best unlabelled class), as in _kl_on_support: v_k = eta y_k / d_k
        # with d = l - l_out. A labelled d <= 0 (no leak possible) makes log d, and so in_mass,
        # NaN or the 0/0 of v, and NaN <= 1 is false; an unlabelled copy has y = 0 and adds nothing.
        d = lp3[:, 2:3] - lp2
        eta = np.exp(np.where(y2 == 0.0, 0.0, y2 * np.log(d)).sum(1, keepdims=True) - gamma)
        v_leak = y2 / d * eta
        in_mass = v_leak.sum(1)
    leak = in_mass <= 1.0
    # Case B (all mass stays on the labelled classes): the two-class solve moves mass from the
    # strictly higher-loss class (hi) to the other. Equal losses (or one labelled class) give
    # no hi, y_hi = 0 and p = 0: v = y, nothing to gain.
    hi = lp2 < lp2.max(1, keepdims=True)
    y_hi = (y2 * hi).sum(1, keepdims=True)
    if gamma < _KL_GAMMA_RESOLUTION:
        v_stay = y2
    else:
        p = _kl_two_class_high_mass_np(y_hi, gamma)
        v_stay = np.where(hi, p, y2 + (y_hi - p))
    w = np.empty_like(lp3)
    w[:, :2] = np.where(leak[:, None], v_leak, v_stay)
    w[:, 2] = np.where(leak, 1.0 - in_mass, 0.0)
    moved = 0.5 * (np.abs(w[:, :2] - y2).sum(1) + w[:, 2])
    return w, moved


def _kl_on_support(l: Tensor, y: Tensor, in_min: Tensor, out_min: Tensor,
                   gamma: float) -> tuple[Tensor, Tensor]:
    """v on the given columns (entries with y = 0 get 0) and the mass leaked to the best class
    off the support. l, y [n, m]; in_min, out_min [n] over the full rows."""
    support = y > 0
    # Case A: mass leaks to the best class off the support. With d = l - l_out > 0 on S,
    # v_k = eta * y_k / d_k, eta = exp(-gamma + sum_S y log d); valid while sum_S v <= 1.
    leak_possible = out_min < in_min
    d = (l - out_min.unsqueeze(1)).masked_fill(~(support & leak_possible.unsqueeze(1)), 1.0)
    log_d = torch.log(d)
    log_eta = -gamma + (y * log_d).sum(1)
    v_leak = torch.exp(log_eta.unsqueeze(1) - log_d) * y
    in_mass = v_leak.sum(1)
    leak = leak_possible & (in_mass <= 1.0)

    # Case B: all mass on S, v_k ∝ y_k / (dd_k + s) with dd = l - min_S l >= 0 and s > 0.
    # KL(s) = sum_S y log(dd + s) + log(sum_S y / (dd + s)) decreases from +inf to 0.
    dd = (l - in_min.unsqueeze(1)).masked_fill(~support, 0.0)
    dev = dd - (y * dd).sum(1, keepdim=True)
    var = (y * dev * dev).sum(1)
    # var == 0: every labelled class has the same loss, nothing to gain: v = y.
    v_stay = torch.where((var > 0).unsqueeze(1), _kl_stay_weights(dd, y, var, gamma), y)
    v = torch.where(leak.unsqueeze(1), v_leak, v_stay)
    return v, torch.where(leak, (1.0 - in_mass).clamp_min(0.0), torch.zeros_like(in_mass))


def _kl_stay_weights(dd: Tensor, y: Tensor, var: Tensor, gamma: float) -> Tensor:
    if gamma < _KL_GAMMA_RESOLUTION:
        return y
    if y.shape[1] == 2:
        return _kl_two_class(dd, y, gamma)
    log_gamma = math.log(gamma)
    # Large-s expansion KL ~ var / (2 s^2) gives the starting point. A bracket [lo, hi] with
    # KL(lo) > gamma >= KL(hi) catches any Newton step that leaves it (bisection instead).
    u = (0.5 * torch.log(var.clamp_min(1e-300) / (2.0 * gamma))).clamp(-_KL_LOG_S_LIMIT, _KL_LOG_S_LIMIT)
    lo = torch.full_like(u, -torch.inf)
    hi = torch.full_like(u, torch.inf)
    # Off the support y = 0 and t = dd + s > 0, so y/t and y*log(t) vanish there unmasked.
    finite_lo = torch.zeros_like(u, dtype=torch.bool)
    finite_hi = torch.zeros_like(finite_lo)
    for _ in range(_KL_NEWTON_STEPS):
        s = torch.exp(u)
        t = dd + s[:, None]
        q = y / t
        a = q.sum(1)
        b = (q / t).sum(1)
        kl = ((y * torch.log(t)).sum(1) + torch.log(a)).clamp_min(1e-300)
        too_far = kl > gamma
        lo = torch.where(too_far, u, lo)
        hi = torch.where(too_far, hi, u)
        finite_lo = finite_lo | too_far
        finite_hi = finite_hi | ~too_far
        dkl_du = (s * (a - b / a)).clamp_max(-1e-300)  # <= 0 by Cauchy-Schwarz
        # Newton on whichever form is nearly linear in u: KL itself where KL > gamma (small s,
        # KL ~ -y_min * u), log KL where KL <= gamma (large s, log KL ~ -2u).
        step = torch.where(too_far, (kl - gamma) / dkl_du, (torch.log(kl) - log_gamma) * kl / dkl_du)
        cand = u - step
        # Outside the bracket: bisect, or jump 16 units (a factor e^16 in s) from its one finite
        # end. Also jump when KL is far below gamma: there KL = sum y log t + log a is a
        # difference of nearly equal numbers, below float64 resolution, and the step is noise.
        fallback = torch.where(finite_lo & finite_hi, 0.5 * (lo + hi), torch.where(finite_lo, lo + 16.0, hi - 16.0))
        trusted = (cand >= lo) & (cand <= hi) & (kl > gamma * 1e-6)
        u = torch.where(trusted, cand, fallback).clamp(-_KL_LOG_S_LIMIT, _KL_LOG_S_LIMIT)
    q = y / (dd + torch.exp(u)[:, None])
    return q / q.sum(1, keepdim=True)


def _kl_two_class(dd: Tensor, y: Tensor, gamma: float) -> Tensor:
    # Rows whose second column is not labelled (y = 0) are discarded by the caller (var = 0).
    first_low = dd[:, 0] <= dd[:, 1]
    p = _kl_two_class_high_mass(torch.where(first_low, y[:, 1], y[:, 0]), gamma)
    return torch.stack([torch.where(first_low, 1.0 - p, p), torch.where(first_low, p, 1.0 - p)], 1)


def _kl_two_class_high_mass(y_hi: Tensor, gamma: float) -> Tensor:
    """The least mass p on the higher-loss of two labelled classes with KL(y || v) <= gamma,
    for its share y_hi (any shape, float64, the other share 1 - y_hi, gamma >= _KL_GAMMA_RESOLUTION)."""
    # Whatever the loss gap, the optimum is the smallest feasible p. In z = log p,
    # f(z) = y_lo log(y_lo/(1-e^z)) + y_hi log(y_hi) - y_hi z - gamma is convex and decreasing
    # for p < y_hi, so Newton converges monotonically from either side with no bracket.
    # Shares are normalised separately, so a 1e-16 partner can leave y_hi = 1 and y_lo = 0
    # (log(1 - p) = -inf below): keep y_hi at the largest float64 below 1.
    share = y_hi
    y_hi = y_hi.clamp(1e-300, 1.0 - 2.0**-53)
    y_lo = 1.0 - y_hi
    log_y_hi = torch.log(y_hi)
    const = torch.xlogy(y_lo, y_lo).addcmul_(y_hi, log_y_hi).sub_(gamma)
    # Start at p = y_hi e^-r, r = sqrt(2 gamma y_lo / y_hi): the small-gamma expansion
    # KL ~ (p - y_hi)^2 / (2 y_lo y_hi) where r is small, and inside (0, y_hi) for any r.
    z = log_y_hi.sub_(y_lo.div(y_hi).mul_(2.0 * gamma).sqrt_())
    neg_y_hi = -y_hi
    # Iterates stay below the start (< 1), and p underflowing to 0 far left is harmless (f is
    # linear in z there), so only the result needs clamping.
    for _ in range(_KL_TWO_CLASS_NEWTON_STEPS):
        p = torch.exp(z)
        q = 1.0 - p
        f = torch.addcmul(const, y_lo, torch.log(q), value=-1.0).addcmul_(y_hi, z, value=-1.0)
        # slope -> 0 only as p -> y_hi (KL's minimum), where f ~ slope^2 - gamma is already
        # feasible: stay rather than divide by ~0 (tiny gamma puts the start exactly there).
        slope = torch.addcmul(neg_y_hi, y_lo, p.div_(q))
        z.addcdiv_(f.masked_fill_(slope >= -1e-9, 0.0), slope.clamp_max_(-1e-9), value=-1.0)
    # Against the unclamped share: y_hi = 0 (no higher-loss class) gives p = 0 exactly.
    return torch.exp(z.clamp_(-_KL_TWO_CLASS_LOG_P_LIMIT, _LOG_ONE_MINUS_EPS)).minimum(share)


def _kl_two_class_high_mass_np(y_hi: np.ndarray, gamma: float) -> np.ndarray:
    """_kl_two_class_high_mass in NumPy (float64, any shape) for the CPU fast path; the same
    iteration step for step (tests compare the two)."""
    share = y_hi
    y_hi = np.clip(y_hi, 1e-300, 1.0 - 2.0**-53)
    y_lo = 1.0 - y_hi  # >= 2^-53: y_lo log y_lo needs no xlogy
    log_y_hi = np.log(y_hi)
    const = y_lo * np.log(y_lo) + y_hi * log_y_hi - gamma
    z = log_y_hi - np.sqrt(2.0 * gamma * y_lo / y_hi)
    for _ in range(_KL_TWO_CLASS_NEWTON_STEPS):
        p = np.exp(z)
        q = 1.0 - p
        f = const - y_lo * np.log(q) - y_hi * z
        slope = y_lo * (p / q) - y_hi
        z -= np.where(slope >= -1e-9, 0.0, f) / np.minimum(slope, -1e-9)
    return np.minimum(np.exp(np.clip(z, -_KL_TWO_CLASS_LOG_P_LIMIT, _LOG_ONE_MINUS_EPS)), share)


def _l2_weights(l: Tensor, y: Tensor, gamma: float) -> Tensor:
    # v(t) = proj(y - t l) moves monotonically away from y as t grows; keep the largest t with
    # ||v(t) - y||^2 <= gamma. t is scaled by the loss range so the bracket is unit-free.
    # Shifting a row by a constant leaves proj(y - t l) unchanged (the simplex fixes the sum);
    # without it, nearly equal losses make t huge and t*l rounds y away entirely.
    l64 = l.to(torch.float64)
    l64 = l64 - l64.amin(1, keepdim=True)
    y64 = y.to(torch.float64)
    spread = (l64.amax(1) - l64.amin(1)).clamp_min(1e-12)[:, None]
    lo = torch.full((l.shape[0], 1), -30.0, dtype=torch.float64, device=l.device)
    hi = torch.full_like(lo, 30.0)
    v_hi = project_rows_to_simplex(y64 - torch.exp(hi) / spread * l64)
    hi_ok = ((v_hi - y64) ** 2).sum(1, keepdim=True) <= gamma
    for _ in range(_L2_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        v = project_rows_to_simplex(y64 - torch.exp(mid) / spread * l64)
        ok = ((v - y64) ** 2).sum(1, keepdim=True) <= gamma
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    v_lo = project_rows_to_simplex(y64 - torch.exp(lo) / spread * l64)
    return torch.where(hi_ok, v_hi, v_lo).to(l.dtype)
