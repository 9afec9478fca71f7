"""CICWLoss: every method, the Danskin gradient, burn-in, checkpoints, diagnostics."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cicw
from cicw.diagnostics import WEIGHT_HISTOGRAM_EDGES

K = 4
METHODS = ["ce", "mixup", "gce", "ciw", "cicw", "ciw_m", "cicw_m"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, K))


def _batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, K, (n,), generator=g)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("burn_in", [0, 3])
def test_every_method_gives_finite_loss_and_weights(method: str, burn_in: int) -> None:
    model = _model()
    loss_fn = cicw.CICWLoss(cicw.CICWConfig(gate="steps", method=method, burn_in_steps=burn_in, anneal_steps=2),
                            num_classes=K, generator=torch.Generator().manual_seed(0))
    x, y = _batch()
    out = loss_fn(model, x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert out.weights.shape == (24,)
    torch.testing.assert_close(out.weights.sum(), torch.tensor(1.0))
    # Weighted mixup methods train like CE until their weights switch on: a clean forward.
    assert (out.logits is None) == (method == "mixup")
    d = out.diagnostics.as_dict()
    assert d["num_examples"] == 24 and d["in_burn_in"] == float(burn_in > 0)
    assert sum(d["weight_histogram"]) == 24 and sum(d["class_count"]) == 24


def test_gradient_is_weighted_sum_of_per_example_gradients() -> None:
    model = _model()
    x, y = _batch(10)
    cfg = cicw.CICWConfig(gate="steps", method="cicw", lam=0.3, gamma=0.2, class_divergence="kl",
                          burn_in_steps=0, anneal_steps=0)
    out = cicw.CICWLoss(cfg, num_classes=K)(model, x, y)
    out.loss.backward()
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    expected = torch.zeros_like(total)
    for i in range(10):
        model.zero_grad()
        lp = F.log_softmax(model(x[i:i + 1]), -1)
        li = cicw.class_reweighted_loss(lp, y[i:i + 1], divergence="kl", gamma=0.2)
        li.sum().backward()
        expected += out.weights[i] * torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.weights, torch.full((10,), 0.1))  # really reweighted


def test_burn_in_trains_like_ce_and_annealing_follows_schedule() -> None:
    model = _model()
    x, y = _batch()
    cfg = cicw.CICWConfig(gate="steps", method="cicw", lam=1.0, burn_in_steps=2, anneal_steps=4,
                          anneal_factor=10.0)
    loss_fn = cicw.CICWLoss(cfg, num_classes=K)
    out = loss_fn(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))
    lams = []
    for _ in range(8):
        lams.append(float(loss_fn(model, x, y).diagnostics.lam))
        loss_fn.step()
    assert lams == pytest.approx([10.0, 10.0, 10.0, 7.75, 5.5, 3.25, 1.0, 1.0])


def test_schedule_survives_state_dict_roundtrip() -> None:
    cfg = cicw.CICWConfig(gate="steps", method="cicw_m", burn_in_steps=5)
    a = cicw.CICWLoss(cfg, num_classes=K)
    for _ in range(7):
        a.step()
    b = cicw.CICWLoss(cfg, num_classes=K)
    b.load_state_dict(a.state_dict())
    assert b.schedule.steps_done == 7 and not b.schedule.in_burn_in
    with pytest.raises(ValueError, match="version"):
        b.load_state_dict({"_extra_state": {"schedule": {"version": 99, "steps_done": 1}}})


def test_mislabelled_examples_get_low_weight_and_class_mass_moves() -> None:
    # A model confident in class 0: the examples labelled 3 disagree with it.
    logits = torch.tensor([[6.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 3, 3])
    # No class share cap: a whole class the model disputes may lose weight here.
    cfg = cicw.CICWConfig(gate="steps", method="cicw", lam=0.5, gamma=0.5, burn_in_steps=0, anneal_steps=0,
                          class_share_cap=None)
    out = cicw.CICWLoss(cfg, num_classes=K)(lambda _: logits, torch.zeros(8, 1), y)
    assert out.weights[6:].max() < 0.1 * out.weights[:6].min()
    d = out.diagnostics
    assert float(d.class_mean_weight[0]) > 1.0 > float(d.class_mean_weight[3])
    assert torch.isnan(d.class_mean_weight[1])  # absent class
    assert float(d.low_weight_fraction) == pytest.approx(2 / 8)
    # 2 of 8 examples move 1 - e^-0.5 of their mass; the others agree with the model already.
    assert float(d.class_mass_moved) == pytest.approx(2 / 8 * (1 - torch.exp(torch.tensor(-0.5)).item()), rel=1e-5)
    assert float(d.ess) < 8.0


def test_histogram_bins_scaled_weights() -> None:
    w = torch.tensor([0.0, 0.1, 0.2, 0.7], dtype=torch.float64)
    d = cicw.CICWDiagnostics(w, torch.zeros(4), torch.zeros(4), num_classes=2, lam=1.0, in_burn_in=False)
    # n*w = 0, 0.4, 0.8, 2.8 -> bins [0,.125), [.25,.5), [.5,1), [2,4)
    assert d.weight_histogram.tolist() == [1, 0, 1, 1, 0, 1, 0, 0]
    assert len(WEIGHT_HISTOGRAM_EDGES) - 1 == 8


def test_soft_targets_accepted() -> None:
    model = _model()
    x, _ = _batch(12)
    y = torch.softmax(torch.randn(12, K), -1)
    out = cicw.CICWLoss(cicw.CICWConfig(gate="steps", method="cicw_m", burn_in_steps=0),
                        num_classes=K)(model, x, y)
    assert torch.isfinite(out.loss)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="method"):
        cicw.CICWConfig(method="bogus")
    with pytest.raises(pydantic.ValidationError, match="lam"):
        cicw.CICWConfig(lam=0)
    with pytest.raises(pydantic.ValidationError, match="radius"):
        cicw.CICWConfig(instance_divergence="tv")
    with pytest.raises(pydantic.ValidationError, match="unknown_field"):
        cicw.CICWConfig(unknown_field=1)


def test_bad_targets_raise_clear_errors() -> None:
    loss_fn = cicw.CICWLoss(cicw.CICWConfig(gate="steps", method="cicw"), num_classes=K)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        loss_fn(_model(), torch.zeros(2, 6), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="sum to 1"):
        loss_fn(_model(), torch.zeros(2, 6), torch.full((2, K), 0.5))
    with pytest.raises(ValueError, match="num_classes"):
        cicw.CICWLoss(cicw.CICWConfig(), num_classes=1)


def test_empty_batch_is_defined() -> None:
    out = cicw.CICWLoss(cicw.CICWConfig(gate="steps", method="cicw", burn_in_steps=0), num_classes=K)(
        _model(), torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    assert float(out.loss.detach()) == 0.0 and out.weights.shape == (0,)
