"""Two gloo processes with local batches give what one process gives on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cicw

pytestmark = pytest.mark.distributed

WORLD = 2
K = 5
# Unequal local batches, and one configuration where rank 1 holds nothing at all.
SPLITS = [(7, 5), (12, 0)]
CONFIGS = {
    "ce": dict(method="ce"),
    "cicw": dict(method="cicw", lam=0.5, gamma=0.1, class_divergence="kl"),
    "cicw_tv": dict(method="cicw", instance_divergence="tv", radius=0.3, class_divergence="tv", gamma=0.2),
    "cicw_m": dict(method="cicw_m", lam=0.5, gamma=0.05, mixup_mode="sample_weight"),
    "ciw_m_sample": dict(method="ciw_m", alpha=0.1, lam=0.2, mixup_mode="sample"),
    "cicw_m_ls": dict(method="cicw_m", mixup_mode="label_smoothing", recompute_on_mixed=False),
    # The memorization gate, opened: held-out rows (a third, by global row id) out of the
    # weights and the mixed batch on every rank alike, and one gap for all ranks.
    "ciw_gated": dict(method="ciw", gate="memorization", holdout_fraction=0.3),
    "cicw_m_gated": dict(method="cicw_m", lam=0.5, mixup_mode="sample_weight", gate="memorization",
                         holdout_fraction=0.3),
}


def _model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, K))


def _global_batch(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(total, 3, generator=g), torch.randint(0, K, (total,), generator=g)


def _step(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    cfg = cicw.CICWConfig(**{"gate": "steps", **CONFIGS[name]}, burn_in_steps=0, anneal_steps=0)
    loss_fn = cicw.CICWLoss(cfg, num_classes=K, generator=torch.Generator().manual_seed(7))
    if loss_fn.gate is not None:
        loss_fn.gate.opened_at = 0
        loss_fn.schedule.start()
    model.zero_grad()
    out = loss_fn(model, x, y, example_ids=ids if loss_fn.gate is not None else None)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    gap = torch.tensor(loss_fn.gate.gap if loss_fn.gate is not None else 0.0)
    return {"weights": out.weights.detach(), "grads": grads, "loss": out.loss.detach(),
            "ess": out.diagnostics.ess, "moved": out.diagnostics.class_mass_moved, "gap": gap}


def _rank_main(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for split in SPLITS:
            x, y = _global_batch(sum(split))
            start = sum(split[:rank])
            xs, ys = x[start:start + split[rank]], y[start:start + split[rank]]
            losses = torch.linspace(0.1, 3.0, sum(split))[start:start + split[rank]]
            results[(split, "instance")] = cicw.instance_weights(losses, alpha=0.5, lam=0.3)
            ids = torch.arange(sum(split))[start:start + split[rank]]
            for name in CONFIGS:
                r = _step(_model(), name, xs, ys, ids)
                dist.all_reduce(r["grads"])  # what DDP does, before its division by the world size
                dist.all_reduce(r["loss"])
                results[(split, name)] = r
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
def test_instance_weights_are_global(rank_results: list[dict], split: tuple[int, int]) -> None:
    total = sum(split)
    expected = cicw.instance_weights(torch.linspace(0.1, 3.0, total), alpha=0.5, lam=0.3)
    got = torch.cat([rank_results[r][(split, "instance")] for r in range(WORLD)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    if min(split) > 0:  # each rank holds a slice of the global weights, not a normalised batch
        assert abs(float(rank_results[0][(split, "instance")].sum()) - 1.0) > 1e-3


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_matches_single_process(rank_results: list[dict], split: tuple[int, int], name: str) -> None:
    x, y = _global_batch(sum(split))
    single = _step(_model(), name, x, y, torch.arange(sum(split)))
    if name.endswith("_gated"):
        assert 0 < int((single["weights"] == 0).sum()) < sum(split)  # some rows held out, not all
    weights = torch.cat([rank_results[r][(split, name)]["weights"] for r in range(WORLD)])
    torch.testing.assert_close(weights, single["weights"], atol=1e-5, rtol=1e-5)
    for r in range(WORLD):
        torch.testing.assert_close(rank_results[r][(split, name)]["grads"], single["grads"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank_results[r][(split, name)]["loss"], single["loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank_results[r][(split, name)]["ess"], single["ess"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rank_results[r][(split, name)]["moved"], single["moved"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rank_results[r][(split, name)]["gap"], single["gap"], atol=1e-6, rtol=1e-6)
