"""Does CICW work on real data? Clean test accuracy under synthetic label noise, no Kafka.

Regimes:
- ``replay``: a training subset replayed for many passes, so the model can memorise wrong labels
  (CE's test accuracy visibly peaks and then falls; the curve is plotted).
- ``stream``: one pass over the whole training set, as a stream delivers it; ``--passes N``
  makes it a longer stream (the training set N times over, reshuffled each pass), for when
  each method's clean accuracy peaks and where it ends.
- ``paper``: CIFAR-10 with PreAct ResNet-18 and the paper's protocol (50k steps, batch 128, SGD
  momentum 0.9 Nesterov, LR 0.1 -> 0.01 -> 0.001 -> 0.0001 at 11718/31250/42968, pad-4 crop and
  flip, 10% noisy validation split; reports clean test accuracy at the best noisy-validation step).
  Meant for a GPU; ``--steps`` shortens it for a smoke test.

Every run also reports the final clean test accuracy and, for weighted methods, the mean
normalised weight (n*w) the corrupted examples got relative to the clean ones.

Example (the committed Fashion-MNIST table):
    python bench/noisy_accuracy.py --dataset fashion_mnist --regime replay --out-dir docs/noisy_accuracy
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cicw import CICWConfig, CICWLoss
from cicw.noise import CIFAR10_ASYMMETRIC_MAP, corrupt_labels
from workers.data.datasets import LabelledImages, load_cifar10, load_fashion_mnist
from workers.train.models import build_model

# Fashion-MNIST classes: T-shirt 0, Trouser 1, Pullover 2, Dress 3, Coat 4, Sandal 5, Shirt 6,
# Sneaker 7, Bag 8, Ankle boot 9. Look-alike flips in the spirit of the CIFAR-10 map.
FASHION_MNIST_ASYMMETRIC_MAP = {0: 6, 6: 0, 2: 4, 5: 7, 9: 5}
METHODS = ("ce", "mixup", "gce", "ciw", "cicw", "cicw_m")
WEIGHTED = ("ciw", "cicw", "cicw_m")
# Settings per method beyond CICWConfig's defaults. cicw_m uses the defaults unchanged: that
# is the claim under test (one configuration, no knowledge of the noise rate).
METHOD_SETTINGS: dict[str, dict[str, object]] = {
    "ce": {"method": "ce"},
    "mixup": {"method": "mixup"},
    "gce": {"method": "gce"},
    "ciw": {"method": "ciw"},
    "cicw": {"method": "cicw"},
    "cicw_m": {"method": "cicw_m"},
}


@dataclass(frozen=True)
class Setting:
    kind: str  # symmetric | uniform | asymmetric | none
    rate: float

    @property
    def label(self) -> str:
        return "clean" if self.rate == 0 else f"{self.kind[:4]} {self.rate:.0%}"


@dataclass
class RunResult:
    method: str
    setting: str
    seed: int
    final_test_acc: float
    best_val_test_acc: float
    peak_test_acc: float
    peak_step: int
    corrupted_weight_ratio: float | None
    weights_from_step: int | None  # when the weights switched on (None: never)
    seconds: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, test acc, noisy val acc)


@dataclass
class Data:
    train: LabelledImages
    test: LabelledImages
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    augment: bool


def load(dataset: str, cifar_source: str, cache_dir: str) -> Data:
    if dataset == "fashion_mnist":
        return Data(load_fashion_mnist(split="train"), load_fashion_mnist(split="test"), 10,
                    torch.tensor([0.2860]), torch.tensor([0.3530]), augment=False)
    train = load_cifar10(cifar_source, split="train", cache_dir=cache_dir)
    test = load_cifar10(cifar_source, split="test", cache_dir=cache_dir)
    return Data(train, test, 10, torch.tensor([0.4914, 0.4822, 0.4465]),
                torch.tensor([0.2470, 0.2435, 0.2616]), augment=True)


def prepare(images: torch.Tensor, data: Data, device: torch.device, *, train: bool) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255)
    x = (x - data.mean.to(device).view(1, -1, 1, 1)) / data.std.to(device).view(1, -1, 1, 1)
    if train and data.augment:
        # pad-4 random crop and horizontal flip, on the device
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2, n), device=device)
        rows = (dy[:, None] + torch.arange(h, device=device)).view(n, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=device)).view(n, 1, 1, w)
        x = padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                   torch.arange(x.shape[1], device=device).view(1, -1, 1, 1), rows, cols]
        flip = torch.rand(n, device=device) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, data: Data,
             device: torch.device, batch: int = 2000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        x = prepare(images[i:i + batch], data, device, train=False)
        correct += int((model(x).argmax(1).cpu() == labels[i:i + batch]).sum())
    model.train()
    return correct / max(len(labels), 1)


def run_one(method: str, setting: Setting, seed: int, data: Data, args: argparse.Namespace,
            overrides: dict[str, object]) -> RunResult:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(seed)
    n_total = len(data.train)
    order = torch.randperm(n_total, generator=g)
    subset = order[: args.subset] if args.regime == "replay" and args.subset else order
    n_val = int(len(subset) * args.val_fraction)
    val_idx, train_idx = subset[:n_val], subset[n_val:]
    clean = data.train.labels
    if setting.rate == 0:
        noisy = clean.clone()
    else:
        class_map = (CIFAR10_ASYMMETRIC_MAP if args.dataset == "cifar10" else FASHION_MNIST_ASYMMETRIC_MAP)
        noisy, _ = corrupt_labels(clean, kind=setting.kind, rate=setting.rate,
                                  num_classes=data.num_classes, class_map=class_map, generator=g)
    corrupted = noisy != clean

    torch.manual_seed(seed)
    in_shape = tuple(data.train.images.shape[1:])
    model = build_model(args.model, in_shape=in_shape, num_classes=data.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    steps = args.steps or (args.epochs * len(train_idx) // args.batch_size if args.regime == "replay"
                           else args.passes * len(train_idx) // args.batch_size)
    milestones = [int(steps * f) for f in args.lr_milestones]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    burn_in = int(steps * args.burn_in_fraction)
    settings = {**METHOD_SETTINGS[method], "burn_in_steps": burn_in,
                "anneal_steps": int(steps * args.anneal_fraction), "validate_args": False}
    if method == "cicw_m":
        settings.update(overrides)
    loss_fn = CICWLoss(CICWConfig(**settings), num_classes=data.num_classes,  # type: ignore[arg-type]
                       generator=torch.Generator(device=device).manual_seed(seed))

    # Test files are ordered by class: a shortened evaluation takes a fixed random sample.
    limit = args.eval_examples or None
    test_idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))[:limit]
    start = time.perf_counter()
    curve: list[tuple[int, float, float]] = []
    w_corrupt, w_clean = 0.0, 0.0
    perm, pos = torch.randperm(len(train_idx), generator=g), 0
    for step in range(1, steps + 1):
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(train_idx), generator=g), 0
        idx = train_idx[perm[pos:pos + args.batch_size]]
        pos += args.batch_size
        x = prepare(data.train.images[idx], data, device, train=True)
        out = loss_fn(model, x, noisy[idx].to(device), example_ids=idx.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        loss_fn.step()
        if not out.diagnostics.in_burn_in and method in WEIGHTED:
            judged = out.weights if out.assessed_weights is None else out.assessed_weights  # held-out rows too
            scaled = judged.detach().cpu() * len(idx)
            bad = corrupted[idx]
            if bad.any() and (~bad).any():
                w_corrupt += float(scaled[bad].mean())
                w_clean += float(scaled[~bad].mean())
        if step % args.eval_every == 0 or step == steps:
            test_acc = accuracy(model, data.test.images[test_idx], data.test.labels[test_idx], data, device)
            val_acc = (accuracy(model, data.train.images[val_idx[:limit]], noisy[val_idx[:limit]], data, device)
                       if n_val else float("nan"))
            curve.append((step, test_acc, val_acc))
    best = max(curve, key=lambda c: (c[2], c[0])) if n_val else curve[-1]
    peak = max(curve, key=lambda c: (c[1], -c[0]))
    return RunResult(method=method, setting=setting.label, seed=seed, final_test_acc=curve[-1][1],
                     best_val_test_acc=best[1], peak_test_acc=peak[1], peak_step=peak[0],
                     corrupted_weight_ratio=(w_corrupt / w_clean) if w_clean else None,
                     weights_from_step=loss_fn.schedule.weights_start if method in WEIGHTED else None,
                     seconds=time.perf_counter() - start, curve=curve)


def parse_settings(text: str) -> list[Setting]:
    out = []
    for item in text.split(","):
        kind, _, rate = item.strip().partition(":")
        out.append(Setting("none" if float(rate) == 0 else kind, float(rate)))
    return out


def markdown_table(results: list[RunResult], key: str, settings: list[Setting], methods: list[str],
                   step_key: str | None = None) -> str:
    cols = [s.label for s in settings]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        cells = []
        for c in cols:
            vals = [getattr(r, key) * 100 for r in results if r.method == m and r.setting == c]
            if not vals:
                cells.append("")
                continue
            best = max(statistics.mean(getattr(r, key) * 100 for r in results
                                       if r.method == mm and r.setting == c) for mm in methods
                       if any(r.method == mm and r.setting == c for r in results))
            mean = statistics.mean(vals)
            spread = (max(vals) - min(vals)) / 2
            text = f"{mean:.1f} ± {spread:.1f}"
            if step_key is not None:
                steps = [getattr(r, step_key) for r in results if r.method == m and r.setting == c]
                text += f" [{statistics.mean(steps):.0f}]"
            cells.append(f"**{text}**" if abs(mean - best) < 1e-9 else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[RunResult], settings: list[Setting], methods: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sym = [s for s in settings if s.kind in ("symmetric", "none")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        xs, ys, es = [], [], []
        for s in sym:
            vals = [r.final_test_acc * 100 for r in results if r.method == m and r.setting == s.label]
            if vals:
                xs.append(s.rate * 100)
                ys.append(statistics.mean(vals))
                es.append((max(vals) - min(vals)) / 2)
        axes[0].errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    axes[0].set(xlabel="symmetric label noise (%)", ylabel="clean test accuracy (%)",
                title=f"{title}: final accuracy")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    worst = max((s for s in sym), key=lambda s: (s.rate <= 0.6, s.rate), default=None)
    if worst is not None:
        for m in methods:
            runs = [r for r in results if r.method == m and r.setting == worst.label]
            if runs:
                steps = [c[0] for c in runs[0].curve]
                acc = [statistics.mean(r.curve[i][1] * 100 for r in runs) for i in range(len(steps))]
                axes[1].plot(steps, acc, label=m)
        axes[1].set(xlabel="optimizer step", ylabel="clean test accuracy (%)",
                    title=f"during training, {worst.label} noise")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("fashion_mnist", "cifar10"), default="fashion_mnist")
    p.add_argument("--cifar-source", default="../shared/data/cifar10_jpg.tar.gz")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cicw-stream"))
    p.add_argument("--regime", choices=("replay", "stream", "paper"), default="replay")
    p.add_argument("--settings", default="none:0,symmetric:0.2,symmetric:0.4,symmetric:0.6,symmetric:0.8,"
                   "uniform:0.4,asymmetric:0.4",
                   help="comma-separated kind:rate (kinds: symmetric, uniform, asymmetric)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed+seeds-1")
    p.add_argument("--model", default=None, help="default: mlp (fashion_mnist), preact_resnet18 (cifar10)")
    p.add_argument("--subset", type=int, default=5000, help="replay: training subset size")
    p.add_argument("--epochs", type=int, default=40, help="replay: passes over the subset")
    p.add_argument("--passes", type=int, default=1, help="stream: passes over the training set")
    p.add_argument("--steps", type=int, default=0, help="override the number of optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-milestones", default="", help="fractions of the run, e.g. 0.5,0.75")
    p.add_argument("--burn-in-fraction", type=float, default=0.1)
    p.add_argument("--anneal-fraction", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1, help="noisy validation split")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: 100; paper regime: steps / 50)")
    p.add_argument("--eval-examples", type=int, default=0,
                   help="score only this many test/validation examples (0: all; for smoke tests)")
    p.add_argument("--cicw-m", default="{}", help="JSON overrides of CICWConfig for cicw_m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="out/noisy_accuracy")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = args.model or ("mlp" if args.dataset == "fashion_mnist" else "preact_resnet18")
    if args.regime == "paper":
        if args.dataset != "cifar10":
            p.error("--regime paper is the CIFAR-10 protocol: use --dataset cifar10")
        args.steps = args.steps or 50_000
        args.lr, args.weight_decay = 0.1, 5e-4
        args.lr_milestones = "0.23436,0.625,0.85936"  # 11718 / 31250 / 42968 of 50000
        args.burn_in_fraction, args.anneal_fraction = 4000 / 50_000, 3000 / 50_000
        args.eval_every = args.eval_every or max(args.steps // 50, 1)
    args.eval_every = args.eval_every or 100
    args.lr_milestones = [float(f) for f in args.lr_milestones.split(",") if f]
    settings = parse_settings(args.settings)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHOD_SETTINGS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    overrides = json.loads(args.cicw_m)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load(args.dataset, args.cifar_source, args.cache_dir)
    results: list[RunResult] = []
    for setting in settings:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for method in methods:
                r = run_one(method, setting, seed, data, args, overrides)
                results.append(r)
                ratio = f"{r.corrupted_weight_ratio:.2f}" if r.corrupted_weight_ratio is not None else "-"
                print(f"{setting.label:>10} seed {seed} {method:>7}: final {r.final_test_acc:.4f} "
                      f"best-val {r.best_val_test_acc:.4f} corrupt/clean weight {ratio} "
                      f"peak {r.peak_test_acc:.4f} at step {r.peak_step} "
                      f"weights from step {r.weights_from_step} ({r.seconds:.0f}s)",
                      file=sys.stderr, flush=True)
        (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results]))

    title = f"{args.dataset} {args.regime}"
    if args.regime == "stream" and args.passes > 1:
        title += f" ({args.passes} passes)"
    report = [f"### {title}: final clean test accuracy (%), mean ± half-range over {args.seeds} seeds",
              "", markdown_table(results, "final_test_acc", settings, methods), "",
              f"### {title}: clean test accuracy (%) at the best noisy-validation step", "",
              markdown_table(results, "best_val_test_acc", settings, methods), "",
              f"### {title}: peak clean test accuracy (%) during training [mean step of the peak]", "",
              markdown_table(results, "peak_test_acc", settings, methods, step_key="peak_step"), ""]
    text = "\n".join(report)
    print(text)
    (out_dir / "table.md").write_text(text)
    plot(results, settings, methods, out_dir / f"{args.dataset}_{args.regime}.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
