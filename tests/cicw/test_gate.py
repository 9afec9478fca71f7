"""The memorization gate: holdout by id, the gap test, and CICWLoss switching weights on with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cicw
from cicw.gate import MemorizationGate, feature_ids, holdout_mask

K = 4


def test_holdout_is_a_stable_fraction_of_any_id_scheme() -> None:
    for ids in (torch.arange(100_000), torch.arange(100_000) * 1_000_003 + 17,
                torch.randint(-(2 ** 62), 2 ** 62, (100_000,), generator=torch.Generator().manual_seed(0))):
        mask = holdout_mask(ids, 0.0625)
        assert 0.058 < float(mask.float().mean()) < 0.067
        assert torch.equal(mask, holdout_mask(ids.clone(), 0.0625))
    with pytest.raises(TypeError, match="int64"):
        holdout_mask(torch.arange(4, dtype=torch.int32), 0.1)


def test_feature_ids_follow_content_not_position() -> None:
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ids = feature_ids(x)
    assert ids.unique().numel() == 64
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(feature_ids(x[order]), ids[order])  # the same example, wherever it sits
    y = x.clone()
    y[3, 0, 5, 5] += 1e-3
    assert feature_ids(y)[3] != ids[3] and torch.equal(feature_ids(y)[4:], ids[4:])
    assert feature_ids(x[:0]).shape == (0,)  # a rank with no rows this step
    raw = (x * 255).to(torch.uint8)
    assert torch.equal(feature_ids(raw), feature_ids(raw.clone()))


def _feed(gate: MemorizationGate, train_mean: float, holdout_mean: float, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        gate.observe(train=train_mean + 0.8 * torch.randn(120, generator=g),
                     holdout=holdout_mean + 0.8 * torch.randn(8, generator=g), step=step)


def test_gate_stays_shut_without_a_gap_and_opens_on_one() -> None:
    for seed in range(5):  # equal losses: noise alone must not open it
        shut = MemorizationGate()
        _feed(shut, 2.0, 2.0, 600, seed)
        assert not shut.is_open, (seed, shut.z_score)
    gate = MemorizationGate(patience=50)
    _feed(gate, 2.0, 2.0, 100, 0)
    _feed(gate, 1.7, 2.0, 200, 1)
    # Significant for 50 steps in a row first: not at the first crossing.
    assert gate.is_open and gate.opened_at is not None and gate.opened_at >= 50 and gate.opened_at < 200
    opened = gate.opened_at
    _feed(gate, 2.0, 2.0, 300, 2)  # once open, for good
    assert gate.is_open and gate.opened_at == opened
    restored = MemorizationGate()
    restored.load_state_dict(gate.state_dict())
    assert restored.opened_at == opened and restored.gap == pytest.approx(gate.gap)


def test_a_brief_excursion_does_not_open_the_gate() -> None:
    def run(excursion: int) -> MemorizationGate:
        gate = MemorizationGate(patience=50)
        g = torch.Generator().manual_seed(0)
        for step in range(400):  # a gap of 0.6 nats for the first `excursion` steps of every 200
            gap = 0.6 if step % 200 < excursion else 0.0
            gate.observe(train=2.0 - gap + 0.8 * torch.randn(120, generator=g),
                         holdout=2.0 + 0.8 * torch.randn(8, generator=g), step=step)
        return gate

    brief = run(10)
    assert not brief.is_open
    restored = MemorizationGate(patience=50)
    restored.load_state_dict(brief.state_dict())
    assert restored.streak == brief.streak
    assert run(150).is_open  # the same gap, held: memorisation


def test_gate_needs_enough_held_out_examples() -> None:
    gate = MemorizationGate(min_holdout=64)
    for step in range(30):  # a huge gap, but only 30 held-out examples so far
        gate.observe(train=torch.zeros(100), holdout=torch.full((1,), 5.0) + 0.1 * step, step=step)
    assert not gate.is_open and gate.z_score == 0.0


def _loss(**overrides: object) -> cicw.CICWLoss:
    settings: dict[str, object] = {"method": "cicw_m", "burn_in_steps": 0, "anneal_steps": 0, **overrides}
    return cicw.CICWLoss(cicw.CICWConfig(**settings), num_classes=K,  # type: ignore[arg-type]
                         generator=torch.Generator().manual_seed(0))


def test_the_gate_needs_example_ids() -> None:
    with pytest.raises(ValueError, match="example_ids"):
        _loss()(nn.Linear(3, K), torch.randn(8, 3), torch.randint(0, K, (8,)))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        _loss()(nn.Linear(3, K), torch.randn(8, 3), torch.randint(0, K, (8,)), example_ids=torch.arange(7))


def test_held_out_rows_never_reach_the_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, K)
    x, y, ids = torch.randn(256, 3), torch.randint(0, K, (256,)), torch.arange(256)
    held = holdout_mask(ids, 0.0625)
    assert 0 < int(held.sum()) < 256
    grads = []
    for labels in (y, torch.where(held, (y + 1) % K, y)):  # relabel only the held-out rows
        model.zero_grad()
        out = _loss(method="ciw")(model, x, labels, example_ids=ids)
        out.loss.backward()
        assert float(out.weights[held].abs().sum()) == 0.0
        assert out.weights.sum().item() == pytest.approx(1.0)
        grads.append(model.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_weights_switch_on_when_a_replayed_set_is_memorised_not_on_fresh_data() -> None:
    """A small set replayed until the model fits its random labels opens the gate; a stream of
    fresh examples of the same kind never does, and its weights stay out of the loss."""

    def run(fresh: bool) -> tuple[cicw.CICWLoss, cicw.CICWOutput]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, K))
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        loss_fn = _loss(method="ciw_m", burn_in_steps=20)
        g = torch.Generator().manual_seed(1)
        pool_x, pool_y = torch.randn(256, 16, generator=g), torch.randint(0, K, (256,), generator=g)
        for step in range(400):
            if fresh:
                x, y = torch.randn(64, 16, generator=g), torch.randint(0, K, (64,), generator=g)
                ids = torch.arange(64) + 64 * step
            else:
                ids = torch.randperm(256, generator=g)[:64]
                x, y = pool_x[ids], pool_y[ids]
            out = loss_fn(model, x, y, example_ids=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            loss_fn.step()
        return loss_fn, out

    replayed, out = run(fresh=False)
    assert replayed.gate is not None and replayed.gate.is_open and replayed.gate.gap > 0.1
    assert not out.diagnostics.as_dict()["in_burn_in"]
    fresh, out = run(fresh=True)
    assert fresh.gate is not None and not fresh.gate.is_open, fresh.gate.z_score
    assert out.diagnostics.as_dict()["in_burn_in"] and out.assessed_weights is not None
    trained = out.weights > 0
    torch.testing.assert_close(out.weights[trained], torch.full_like(out.weights[trained], out.weights.max()))


def test_checkpointed_gate_resumes_open() -> None:
    a = _loss()
    assert a.gate is not None
    a.gate.opened_at = 5
    a.schedule.start()
    b = _loss()
    b.load_state_dict(a.state_dict())
    assert b.gate is not None and b.gate.opened_at == 5 and not b.schedule.in_burn_in



def test_class_shares_are_capped() -> None:
    from cicw.instance import cap_class_shares

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    # Nearly all the mass on class 1 (2 of 8 examples), as when a weak model prefers it.
    w = torch.tensor([0.01, 0.02, 0.01, 0.45, 0.45, 0.02, 0.02, 0.02], dtype=torch.float64)

    def shares(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(4, dtype=torch.float64).index_add_(0, labels, x)

    balanced = cap_class_shares(w, labels, 4, 1.0)  # a cap of 1: every class exactly its share
    torch.testing.assert_close(shares(balanced), torch.tensor([3 / 8, 2 / 8, 3 / 8, 0.0], dtype=torch.float64))
    capped = cap_class_shares(w, labels, 4, 1.5)
    assert capped.sum().item() == pytest.approx(1.0)
    assert shares(capped)[1].item() == pytest.approx(1.5 * 2 / 8)
    for x in (balanced, capped):
        assert (x[1] / x[0]).item() == pytest.approx(2.0)  # within a class the ratios stay
    under = torch.full((8,), 1 / 8, dtype=torch.float64)
    torch.testing.assert_close(cap_class_shares(under, labels, 4, 2.0), under)  # nothing over: unchanged
