"""The standard CIFAR training augmentation on decoded image batches: zero-pad, random crop back
to size, random horizontal flip. Vectorised over the batch; randomness from a passed generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pad_crop_flip(x: Tensor, *, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """x [n, C, H, W] -> [n, C, H, W]: each image zero-padded by ``pad`` pixels, cropped back to
    H x W at a uniformly random offset, and mirrored left-right with probability 1/2."""
    n, _, h, w = x.shape
    if n == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # [n, H, 1]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # [n, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # [n, C, H, W]
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()
