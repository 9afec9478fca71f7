"""Euclidean projection onto the probability simplex, batched over rows."""

from __future__ import annotations

import torch
from torch import Tensor


def project_rows_to_simplex(x: Tensor) -> Tensor:
    """Project each row of ``x`` onto {v : v >= 0, sum v = 1} in the Euclidean norm.

    Sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with u the row sorted
    descending, rho = max{j : u_j - (sum_{i<=j} u_i - 1)/j > 0}, theta = (sum_{i<=rho} u_i - 1)/rho
    and v = max(x - theta, 0). No host synchronisation.

    Shape: x [n, K] -> [n, K].
    """
    u, _ = torch.sort(x, dim=-1, descending=True)
    cssv = torch.cumsum(u, dim=-1) - 1.0
    ks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    active = (u - cssv / ks) > 0
    # rho is the last active index. Index 0 is always active in exact arithmetic, but for huge
    # entries u_0 - (u_0 - 1) rounds to 0, hence the clamp.
    rho = (active * ks).amax(dim=-1, keepdim=True).clamp_min(1)
    theta = cssv.gather(-1, rho.long() - 1) / rho
    return (x - theta).clamp_min(0.0)
