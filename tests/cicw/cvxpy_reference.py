"""Generic convex-solver (cvxpy) solutions of the CICW inner problems, written from their
definitions, for comparison with the library's closed forms. Test-only."""

from __future__ import annotations

import cvxpy as cp
import numpy as np

SOLVER = "CLARABEL"


def class_inner_loss(l: np.ndarray, y: np.ndarray, divergence: str, gamma: float) -> float:
    """min_v <v, l> over the simplex with D(y, v) <= gamma. l, y: [K]."""
    k = len(l)
    v = cp.Variable(k)
    cons = [v >= 0, cp.sum(v) == 1]
    if divergence == "kl":
        s = y > 0
        cons.append(cp.sum(cp.rel_entr(y[s], v[s])) <= gamma)
    elif divergence == "tv":
        cons.append(0.5 * cp.norm1(v - y) <= gamma)
    elif divergence == "l1":
        cons.append(cp.norm1(v - y) <= gamma)
    elif divergence == "l2":
        cons.append(cp.sum_squares(v - y) <= gamma)
    else:
        raise ValueError(divergence)
    prob = cp.Problem(cp.Minimize(l @ v), cons)
    prob.solve(solver=SOLVER)
    assert prob.status == cp.OPTIMAL, prob.status
    return float(prob.value)


def kl_instance_weights(losses: np.ndarray, lam: float) -> np.ndarray:
    """argmin_w sum w l + lam KL(w || uniform) over the simplex."""
    n = len(losses)
    w = cp.Variable(n)
    # KL(w || u) = sum w log(n w) = sum w log w + log n
    prob = cp.Problem(cp.Minimize(losses @ w - lam * cp.sum(cp.entr(w)) + lam * np.log(n)),
                      [w >= 0, cp.sum(w) == 1])
    prob.solve(solver=SOLVER)
    assert prob.status == cp.OPTIMAL, prob.status
    return np.asarray(w.value)


def tv_instance_objective(losses: np.ndarray, radius: float) -> float:
    """min_w sum w l over the simplex with 0.5 |w - u|_1 <= radius (an LP; report the value)."""
    n = len(losses)
    w = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(losses @ w),
                      [w >= 0, cp.sum(w) == 1, 0.5 * cp.norm1(w - 1.0 / n) <= radius])
    prob.solve(solver=SOLVER)
    assert prob.status == cp.OPTIMAL, prob.status
    return float(prob.value)
