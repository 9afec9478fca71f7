"""Two moons with 30% flipped labels: cross entropy against CIW.

    python -m cicw.examples.two_moons --out moons.png

Trains the same small MLP twice (SGD with momentum), once with plain CE and once with CIW
instance weights, and draws both decision boundaries. Points are coloured by their given
(possibly wrong) label, flipped points are ringed in black, and each point's area is
proportional to the weight CIW gives it at the end of training: wrong labels should shrink.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cicw import CICWConfig, CICWLoss, instance_weights
from cicw.noise import corrupt_labels


def make_moons(n: int, *, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaving half circles with Gaussian jitter. Returns x [n, 2] and labels [n]."""
    half = n // 2
    t = torch.rand(n, generator=generator) * math.pi
    label = (torch.arange(n) >= half).long()
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    x = torch.where(label[:, None] == 0, upper, lower)
    x = x + noise * torch.randn(n, 2, generator=generator)
    return x - torch.tensor([0.5, 0.25]), label


@dataclass
class Trained:
    name: str
    model: nn.Module
    test_accuracy: float
    weights: Tensor  # [n] weights over the training set, normalised to mean 1


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def train(method: str, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, *, steps: int,
          seed: int, lam: float) -> Trained:
    torch.manual_seed(seed)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # A step schedule: a small MLP on 2-D points hardly memorises, so the memorization gate
    # would keep the weights off, and this example is here to show what they do.
    config = CICWConfig(method=method, lam=lam, gate="steps", burn_in_steps=steps // 5, anneal_steps=steps // 5)
    loss_fn = CICWLoss(config, num_classes=2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        out = loss_fn(model, x[idx], y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss_fn.step()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        w = instance_weights(losses, lam=lam) * len(y) if method == "ciw" else torch.ones(len(y))
    return Trained(method, model, acc, w)


def draw(runs: list[Trained], x: Tensor, y: Tensor, flipped: Tensor, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    lo, hi = x.min(0).values - 0.4, x.max(0).values + 0.4
    gx, gy = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), 300),
                            torch.linspace(float(lo[1]), float(hi[1]), 300), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    colours = ["#1f77b4", "#d62728"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 5.4))
    for ax, run in zip(axes, runs):
        with torch.no_grad():
            p1 = torch.softmax(run.model(grid), 1)[:, 1].reshape(gx.shape)
        ax.contourf(gx, gy, p1, levels=[0, 0.5, 1], colors=["#cfe0f3", "#f6d0d0"], alpha=0.9)
        ax.contour(gx, gy, p1, levels=[0.5], colors="k", linewidths=1.2)
        size = 18 * run.weights.clamp(max=4.0)
        ax.scatter(x[:, 0], x[:, 1], s=size, c=y, cmap=ListedColormap(colours), alpha=0.8,
                   edgecolors="none")
        ax.scatter(x[flipped, 0], x[flipped, 1], s=size[flipped] + 8, facecolors="none",
                   edgecolors="k", linewidths=0.7)
        kind = "uniform weights" if run.name == "ce" else "area ∝ CIW weight"
        ax.set_title(f"{run.name.upper()}: clean test accuracy {run.test_accuracy:.1%}\n({kind}; "
                     f"black rings = flipped labels)")
        ax.set_xticks([])
        ax.set_yticks([])
    legend = [Line2D([], [], marker="o", ls="", color=colours[0], label="given label 0"),
              Line2D([], [], marker="o", ls="", color=colours[1], label="given label 1"),
              Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="flipped (wrong) label")]
    axes[0].legend(handles=legend, loc="lower left", fontsize=8, framealpha=0.9)
    fig.suptitle("Two moons, 30% of training labels flipped")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(*, out: str, seed: int = 0, noise_rate: float = 0.3, steps: int = 3000, n: int = 600,
        lam: float = 0.5) -> dict[str, float]:
    """Train CE and CIW, write the figure, and return a summary of accuracies and weights."""
    g = torch.Generator().manual_seed(seed)
    x, clean = make_moons(n, noise=0.12, generator=g)
    y, flipped = corrupt_labels(clean, kind="symmetric", rate=noise_rate, num_classes=2, generator=g)
    x_test, y_test = make_moons(2000, noise=0.12, generator=g)
    runs = [train(m, x, y, x_test, y_test, steps=steps, seed=seed, lam=lam) for m in ("ce", "ciw")]
    draw(runs, x, y, flipped, out)
    ciw = runs[1].weights
    return {"ce_test_accuracy": runs[0].test_accuracy, "ciw_test_accuracy": runs[1].test_accuracy,
            "ciw_mean_weight_clean": float(ciw[~flipped].mean()),
            "ciw_mean_weight_flipped": float(ciw[flipped].mean())}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="moons.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.3, help="fraction of labels flipped")
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = run(out=args.out, seed=args.seed, noise_rate=args.noise, steps=args.steps)
    print(f"CE test accuracy {s['ce_test_accuracy']:.1%}, CIW test accuracy {s['ciw_test_accuracy']:.1%}; "
          f"mean CIW weight (1 = uniform): clean labels {s['ciw_mean_weight_clean']:.2f}, "
          f"flipped labels {s['ciw_mean_weight_flipped']:.2f}. Figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
