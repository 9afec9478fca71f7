"""Independent references for the CICW inner problems, written from their definitions (see the
method notes): a generic convex solver (cvxpy, CLARABEL with tight tolerances) and naive float64
numpy closed forms. Test-only; nothing here imports ``cicw``.

Conventions (the same as the public API):

- instance weights: min_{w in simplex_n} sum_i w_i l_i + lam * D(w || uniform), D the Amari
  alpha-divergence D_a(p || q) = sum_i (a p_i + (1-a) q_i - p_i^a q_i^(1-a)) / (a (1-a)), with its
  limits KL(p || q) at a = 1 and KL(q || p) at a = 0; or, for "tv", the LP
  min sum w_i l_i subject to 0.5 * |w - u|_1 <= radius.
- class weights, per example: min_{v in simplex_K} sum_k v_k l_k subject to D(y, v) <= gamma with
  kl: KL(y || v) = sum_{y_k > 0} y_k log(y_k / v_k); tv: 0.5 |v - y|_1; l1: |v - y|_1;
  l2: |v - y|_2^2.
"""

from __future__ import annotations

import math
import warnings

import cvxpy as cp
import numpy as np

SOLVER = "CLARABEL"
# Tight first; power cones sometimes stall there (status optimal_inaccurate), so retry looser.
# Every tolerance tried is far below the tests' 1e-4 agreement.
TOLERANCES = (1e-10, 1e-9, 1e-8)

CLASS_DIVERGENCES = ("kl", "tv", "l1", "l2")


def _solve(prob: cp.Problem) -> None:
    for tol in TOLERANCES:
        with warnings.catch_warnings():  # "may be inaccurate": handled by the retry below
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver=SOLVER, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol, max_iter=500)
        if prob.status == cp.OPTIMAL:
            return
    raise AssertionError(f"cvxpy status {prob.status} at tolerance {TOLERANCES[-1]}")


# ----------------------------------------------------------------------------- class weights


def class_distance(divergence: str, y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """D(y, v) along the last axis, in float64 (KL: +inf when v leaves y's support)."""
    y = np.asarray(y, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if divergence == "kl":
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(y > 0, y * (np.log(np.where(y > 0, y, 1.0)) - np.log(v)), 0.0)
        return terms.sum(-1)
    if divergence == "tv":
        return 0.5 * np.abs(v - y).sum(-1)
    if divergence == "l1":
        return np.abs(v - y).sum(-1)
    if divergence == "l2":
        return ((v - y) ** 2).sum(-1)
    raise ValueError(f"unknown class divergence {divergence!r}")


def class_inner(l: np.ndarray, y: np.ndarray, divergence: str, gamma: float) -> tuple[float, np.ndarray]:
    """(min value, a minimiser v) of  min_{v in simplex} <v, l>  s.t.  D(y, v) <= gamma.

    l, y: [K] float64 (y on the simplex). KL is written as the cross entropy bound
    -sum_S y_k log v_k <= gamma + H(y) over the support S of y, H(y) = -sum_S y_k log y_k
    (KL(y || v) = -H(y) - sum_S y_k log v_k).
    """
    l = np.asarray(l, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k = l.shape[0]
    v = cp.Variable(k)
    cons = [v >= 0, cp.sum(v) == 1]
    if divergence == "kl":
        s = y > 0
        entropy = -float(np.sum(y[s] * np.log(y[s])))
        cons.append(-cp.sum(cp.multiply(y[s], cp.log(v[s]))) <= gamma + entropy)
    elif divergence == "tv":
        cons.append(0.5 * cp.norm1(v - y) <= gamma)
    elif divergence == "l1":
        cons.append(cp.norm1(v - y) <= gamma)
    elif divergence == "l2":
        cons.append(cp.sum_squares(v - y) <= gamma)
    else:
        raise ValueError(f"unknown class divergence {divergence!r}")
    # Shift the losses by their minimum: the same minimiser (sum v = 1), better scaled for the
    # solver when every loss is large; add the shift back to the value.
    shift = float(l.min())
    prob = cp.Problem(cp.Minimize((l - shift) @ v), cons)
    _solve(prob)
    return float(prob.value) + shift, np.asarray(v.value, dtype=np.float64)


def one_hot_closed_form(l: np.ndarray, c: int, divergence: str, gamma: float) -> float:
    """Hard label bootstrapping, from the notes: L = beta l_c + (1 - beta) min_k l_k with
    beta = e^-gamma (kl), 1 - gamma (tv), 1 - gamma/2 (l1); beta clipped at 0."""
    beta = {"kl": math.exp(-gamma), "tv": max(1.0 - gamma, 0.0), "l1": max(1.0 - gamma / 2, 0.0)}[divergence]
    return beta * float(l[c]) + (1.0 - beta) * float(np.min(l))


# ----------------------------------------------------------------------------- instance weights


def alpha_closed_form(losses: np.ndarray, alpha: float, lam: float) -> np.ndarray:
    """w ∝ max((1 - alpha) l + lam, 0)^(1/(alpha - 1)) (alpha != 1), w ∝ exp(-l/lam) (alpha = 1),
    normalised; naive float64 (callers keep the inputs where this neither under- nor overflows)."""
    l = np.asarray(losses, dtype=np.float64)
    if alpha == 1.0:
        w = np.exp(-(l - l.min()) / lam)
    else:
        base = np.maximum((1.0 - alpha) * l + lam, 0.0)
        with np.errstate(divide="ignore"):
            w = np.where(base > 0, base ** (1.0 / (alpha - 1.0)), 0.0)
    return w / w.sum()


def effective_lambda(losses: np.ndarray, alpha: float, lam: float) -> float:
    """The lambda' for which the normalised closed form is the exact simplex optimum.

    With w_i = c * base_i^(1/(alpha-1)) and c the normaliser, the simplex KKT conditions
    l_i + lam' (1 - (n w_i)^(alpha-1)) / (1 - alpha) + nu = 0 hold for lam' = (n c)^(1 - alpha)
    and nu = (lam - lam') / (1 - alpha). (alpha = 1: lam' = lam.)
    """
    if alpha == 1.0:
        return lam
    l = np.asarray(losses, dtype=np.float64)
    base = np.maximum((1.0 - alpha) * l + lam, 0.0)
    with np.errstate(divide="ignore"):
        unnorm = np.where(base > 0, base ** (1.0 / (alpha - 1.0)), 0.0)
    c = 1.0 / unnorm.sum()
    return float((len(l) * c) ** (1.0 - alpha))


def alpha_kkt_residual(w: np.ndarray, losses: np.ndarray, alpha: float, lam: float) -> float:
    """Largest violation of the simplex KKT conditions of min <w,l> + lam D_a(w || u), in loss
    units: on the support, g_i = l_i + lam * phi'(n w_i) must be a constant -nu; off it (only
    reachable for alpha > 1, where phi'(0) is finite) g_i >= -nu. phi'(r) = (1 - r^(a-1))/(1-a),
    log r at a = 1, 1 - 1/r at a = 0."""
    w = np.asarray(w, dtype=np.float64)
    l = np.asarray(losses, dtype=np.float64)
    r = len(l) * w
    pos = w > 0
    if alpha == 1.0:
        dphi = np.log(r[pos])
    elif alpha == 0.0:
        dphi = 1.0 - 1.0 / r[pos]
    else:
        dphi = (1.0 - r[pos] ** (alpha - 1.0)) / (1.0 - alpha)
    g = l[pos] + lam * dphi
    nu = -float(np.mean(g))
    res = float(np.max(np.abs(g + nu)))
    if (~pos).any():
        if alpha <= 1.0:
            return math.inf  # phi'(0) = -inf: a zero weight can never be optimal
        g0 = l[~pos] + lam / (1.0 - alpha)
        res = max(res, float(np.max(np.maximum(-(g0 + nu), 0.0))))
    return res


def alpha_instance_weights(losses: np.ndarray, alpha: float, lam: float) -> tuple[float, np.ndarray]:
    """cvxpy: (min value, minimiser w) of sum w l + lam D_alpha(w || u) over the simplex.

    In r = n w (r = 1 is uniform): n * objective = sum r_i l_i + lam sum_i phi(r_i) with
    phi(r) = (a r + 1 - a - r^a)/(a(1-a)), r log r - r + 1 at a = 1, r - 1 - log r at a = 0.
    Returns the value of the original (not multiplied by n) objective.
    """
    l = np.asarray(losses, dtype=np.float64)
    n = len(l)
    r = cp.Variable(n)
    if alpha == 1.0:
        phi = -cp.entr(r) - r + 1
    elif alpha == 0.0:
        phi = r - 1 - cp.log(r)
    else:
        coef = 1.0 / (alpha * (1.0 - alpha))
        # -r^a/(a(1-a)) is convex for every a outside {0, 1}: r^a is concave on (0,1) where the
        # coefficient is positive, convex elsewhere where it is negative.
        phi = coef * (alpha * r + (1.0 - alpha)) - coef * cp.power(r, alpha)
    shift = float(l.min())
    prob = cp.Problem(cp.Minimize((l - shift) @ r + lam * cp.sum(phi)), [r >= 0, cp.sum(r) == n])
    _solve(prob)
    return float(prob.value) / n + shift, np.asarray(r.value, dtype=np.float64) / n


def kl_instance_weights(losses: np.ndarray, lam: float) -> np.ndarray:
    """cvxpy: argmin_w sum w l + lam KL(w || u) over the simplex (KL = sum w log(n w))."""
    l = np.asarray(losses, dtype=np.float64)
    n = len(l)
    w = cp.Variable(n)
    kl = -cp.sum(cp.entr(w)) + math.log(n)
    prob = cp.Problem(cp.Minimize((l - l.min()) @ w + lam * kl), [w >= 0, cp.sum(w) == 1])
    _solve(prob)
    return np.asarray(w.value, dtype=np.float64)


def tv_instance_lp(losses: np.ndarray, radius: float) -> tuple[float, np.ndarray]:
    """cvxpy: (min value, a minimiser) of sum w l over the simplex with 0.5 |w - u|_1 <= radius.
    LP optima may tie: compare values, not weights."""
    l = np.asarray(losses, dtype=np.float64)
    n = len(l)
    w = cp.Variable(n)
    shift = float(l.min())
    prob = cp.Problem(cp.Minimize((l - shift) @ w),
                      [w >= 0, cp.sum(w) == 1, 0.5 * cp.norm1(w - 1.0 / n) <= radius])
    _solve(prob)
    return float(prob.value) + shift, np.asarray(w.value, dtype=np.float64)
