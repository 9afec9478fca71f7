"""Weighted mixup draws, the Beta sampler, and the schedule."""

from __future__ import annotations

import pytest
import torch

import cicw
from cicw.mixup import sample_beta


def _identity_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x = y = I: row i of the mixed batch reads off r_i at column i and (1 - r_i) at the partner.
    return torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)


def _partner_and_ratio(xm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = xm.shape[0]
    own = xm.diagonal()
    off = xm - torch.diag(own)
    partner = torch.where(off.max(1).values > 0, off.argmax(1), torch.arange(n))
    return partner, own


def test_sample_weight_never_picks_zero_weight_partners_and_uses_weight_ratios() -> None:
    n = 6
    x, y = _identity_batch(n)
    w = torch.tensor([0.4, 0.3, 0.3, 0.0, 0.0, 0.0])
    xm, ym = cicw.weighted_mixup(x, y, w, mode="sample_weight", generator=torch.Generator().manual_seed(3))
    partner, ratio = _partner_and_ratio(xm)
    assert set(partner.tolist()) <= {0, 1, 2}
    for i in range(n):
        j = int(partner[i])
        if j != i:
            assert float(ratio[i]) == pytest.approx(float(w[i] / (w[i] + w[j])))
    # zero-weight rows take all of their partner: their own label is gone
    assert torch.allclose(ym[3:, 3:], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(ym.sum(1), torch.ones(n, dtype=torch.float64))


def test_power_sharpens_partner_choice() -> None:
    n = 200
    x, y = _identity_batch(n)
    w = torch.full((n,), 0.5 / (n - 1))
    w[0] = 0.5
    picks = {}
    for p in (1.0, 3.0):
        xm, _ = cicw.weighted_mixup(x, y, w, mode="sample", power=p, generator=torch.Generator().manual_seed(0))
        partner, _ = _partner_and_ratio(xm)
        picks[p] = int((partner == 0).sum())
    assert picks[3.0] > picks[1.0] > 50


def test_modes_are_deterministic_given_generator_and_keep_targets_on_simplex() -> None:
    x, y = torch.randn(16, 3), torch.softmax(torch.randn(16, 5), -1)
    w = torch.softmax(torch.randn(16), 0)
    preds = torch.randn(16, 5)
    for mode in cicw.MIXUP_MODES:
        a = cicw.weighted_mixup(x, y, w, mode=mode, predictions=preds, generator=torch.Generator().manual_seed(1))
        b = cicw.weighted_mixup(x, y, w, mode=mode, predictions=preds, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1].sum(1), torch.ones(16))
        assert (a[1] >= 0).all()


def test_label_smoothing_moves_low_weight_targets_to_prediction() -> None:
    n = 4
    x = torch.zeros(n, 1)
    y = torch.eye(4)[[1, 1, 1, 1]]
    preds = torch.eye(4)[[2, 2, 2, 2]] * 10
    w = torch.tensor([0.97, 0.01, 0.01, 0.01])
    _, ym = cicw.weighted_mixup(x, y, w, mode="label_smoothing", beta=1e-3, predictions=preds,
                                generator=torch.Generator().manual_seed(0))
    # Beta(1e-3, 1e-3) ratios are ~0 or ~1, so each row is (almost) one smoothed target; the
    # trusted row keeps its label, the distrusted rows' labels become the prediction.
    assert float(ym[:, 2].sum()) > 2.0
    with pytest.raises(ValueError, match="predictions"):
        cicw.weighted_mixup(x, y, w, mode="label_smoothing")


@pytest.mark.parametrize("a", [0.2, 1.0, 2.0, 8.0])
def test_beta_sampler_moments(a: float) -> None:
    s = sample_beta(a, 200_000, generator=torch.Generator().manual_seed(0))
    assert ((s >= 0) & (s <= 1)).all()
    assert float(s.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(s.var()) == pytest.approx(1.0 / (4 * (2 * a + 1)), rel=0.03)


def test_mixup_argument_errors() -> None:
    x, y, w = torch.zeros(3, 2), torch.eye(3), torch.ones(3) / 3
    with pytest.raises(ValueError, match="mode must be one of"):
        cicw.weighted_mixup(x, y, w, mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights must be"):
        cicw.weighted_mixup(x, y, torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        cicw.weighted_mixup(x, y, w, beta=0.0)


def test_schedule() -> None:
    s = cicw.Schedule(burn_in_steps=3, anneal_steps=2, anneal_factor=5.0)
    seen = []
    for _ in range(7):
        seen.append((s.in_burn_in, s.lam(2.0)))
        s.step()
    assert seen == [(True, 10.0), (True, 10.0), (True, 10.0), (False, 10.0), (False, 6.0),
                    (False, 2.0), (False, 2.0)]
    restored = cicw.Schedule(3, 2, 5.0)
    restored.load_state_dict(s.state_dict())
    assert restored.steps_done == 7
    with pytest.raises(ValueError):
        cicw.Schedule(anneal_factor=0.5)
