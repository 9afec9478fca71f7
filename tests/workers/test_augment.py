"""pad_crop_flip against a per-image reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.train.augment import pad_crop_flip


def test_each_image_is_a_shifted_window_of_its_padding_maybe_mirrored() -> None:
    x = torch.rand(64, 3, 8, 6)
    out = pad_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts, flips = set(), 0
    for img, aug in zip(x, out):
        padded = F.pad(img, (2, 2, 2, 2))
        windows = {(dy, dx): padded[:, dy:dy + 8, dx:dx + 6] for dy in range(5) for dx in range(5)}
        found = [(dy, dx, f) for (dy, dx), win in windows.items() for f in (False, True)
                 if torch.equal(aug, win.flip(-1) if f else win)]
        assert found, "not a crop of the padded image"
        shifts.add(found[0][:2])
        flips += found[0][2]
    assert len(shifts) > 10 and 16 < flips < 48  # offsets and flips really vary
    assert pad_crop_flip(torch.zeros(0, 3, 8, 6)).shape == (0, 3, 8, 6)
