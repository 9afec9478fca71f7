"""What CICW costs: the class-weight solve against a generic convex solver, and whole training
steps against cross entropy, all measured side by side in one run.

(a) Per-batch time of cicw.class_reweighted_loss (KL, gamma 0.01) against the same problems
    solved with cvxpy (one problem per example, as the reference implementation does), n = 128,
    K = 10 and 100, one-hot and soft (mixup-like) targets; the answers are compared too.
(b) Optimizer-step time of CE, mixup, CIW, CICW and CICW-M, as ratios to a plain PyTorch CE step
    (F.cross_entropy). CICW-M forwards the clean batch without gradient and then forwards and
    backpropagates the mixed batch, so it is also compared with a "CE + mixed fwd/bwd" step.
    Methods are interleaved across repeats so drift in machine speed hits them all alike.

    python bench/cicw_overhead.py                 # MLP on CPU, plus PreAct ResNet-18 on CUDA if present
    python bench/cicw_overhead.py --resnet-on-cpu # also time PreAct ResNet-18 on the CPU (slow)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import cicw
from workers.models import build_model

STEP_METHODS = ("ce", "mixup", "ciw", "cicw", "cicw_m")


def soft_targets(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    a, b = torch.randint(0, k, (2, n), generator=g)
    r = torch.distributions.Beta(2.0, 2.0).sample((n, 1))
    return r * F.one_hot(a, k) + (1 - r) * F.one_hot(b, k)


def cvxpy_inner_losses(losses: np.ndarray, y: np.ndarray, gamma: float) -> tuple[np.ndarray, float]:
    """min_v <v, l> s.t. KL(y || v) <= gamma, v on the simplex, per example. Returns losses, seconds."""
    import cvxpy as cp

    start = time.perf_counter()
    out = np.empty(len(losses))
    for i, (l, yi) in enumerate(zip(losses, y)):
        v = cp.Variable(len(l))
        s = yi > 0
        cons = [v >= 0, cp.sum(v) == 1, cp.sum(cp.rel_entr(yi[s], v[s])) <= gamma]
        prob = cp.Problem(cp.Minimize(l @ v), cons)
        prob.solve(solver=cp.CLARABEL)
        out[i] = prob.value
    return out, time.perf_counter() - start


def bench_solver(repeats: int) -> list[str]:
    lines = ["(a) class_reweighted_loss vs cvxpy, n=128, KL gamma=0.01",
             f"{'K':>4} {'targets':>8} {'cicw ms':>9} {'cvxpy ms':>10} {'speed-up':>9} {'max |dL|':>9}"]
    g = torch.Generator().manual_seed(0)
    for k in (10, 100):
        for kind in ("one-hot", "soft"):
            lp = torch.log_softmax(torch.randn(128, k, generator=g, dtype=torch.float64) * 3, -1)
            y = torch.randint(0, k, (128,), generator=g) if kind == "one-hot" else soft_targets(128, k, g).double()
            for _ in range(5):
                cicw.class_reweighted_loss(lp, y, gamma=0.01, validate_args=False)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ours = cicw.class_reweighted_loss(lp, y, gamma=0.01, validate_args=False)
                times.append(time.perf_counter() - t0)
            ours_ms = statistics.median(times) * 1e3
            y_dense = F.one_hot(y, k).double() if kind == "one-hot" else y
            ref, seconds = cvxpy_inner_losses((-lp).numpy(), y_dense.numpy(), 0.01)
            diff = float(np.max(np.abs(ref - ours.numpy())))
            lines.append(f"{k:>4} {kind:>8} {ours_ms:>9.3f} {seconds * 1e3:>10.1f} "
                         f"{seconds * 1e3 / ours_ms:>8.0f}x {diff:>9.1e}")
    return lines


def make_step(method: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, k: int) -> Callable[[], None]:
    if method == "plain_ce":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    if method == "ce+mixed":
        # A CE step plus one more forward and backward of a batch of the same size: the
        # budget CICW-M is held to.
        x2 = x.flip(0)
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            F.cross_entropy(model(x2), y).backward()
            opt.step()
        return step
    cfg = cicw.CICWConfig(method=method, burn_in_steps=0, anneal_steps=0, validate_args=False)  # type: ignore[arg-type]
    loss_fn = cicw.CICWLoss(cfg, num_classes=k, generator=torch.Generator(device=x.device).manual_seed(0))
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).loss.backward()
        opt.step()
    return step


def bench_steps(name: str, device: torch.device, repeats: int, inner: int) -> list[str]:
    torch.manual_seed(0)
    in_shape = (1, 28, 28) if name == "mlp" else (3, 32, 32)
    model = build_model(name, in_shape=in_shape, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(128, *in_shape, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    methods = ("plain_ce", *STEP_METHODS, "ce+mixed")
    steps = {m: make_step(m, model, opt, x, y, 10) for m in methods}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in methods:  # warm-up
        for _ in range(3):
            steps[m]()
    sync()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[m]()
            sync()
            times[m].append((time.perf_counter() - t0) / inner)
    med = {m: statistics.median(v) for m, v in times.items()}
    lines = [f"(b) step time, {name} on {device.type}, batch 128 (median of {repeats} x {inner} steps)",
             f"{'method':>10} {'ms/step':>9} {'/ CE':>7}"]
    for m in methods:
        lines.append(f"{m:>10} {med[m] * 1e3:>9.3f} {med[m] / med['plain_ce']:>7.3f}")
    for m in ("ciw", "cicw"):
        ratio = med[m] / med["plain_ce"]
        lines.append(f"target {m} <= 1.05 x CE: {ratio:.3f} {'PASS' if ratio <= 1.05 else 'FAIL'}")
    ratio = med["cicw_m"] / med["ce+mixed"]
    lines.append(f"target cicw_m <= 1.05 x (CE + mixed fwd/bwd): {ratio:.3f} {'PASS' if ratio <= 1.05 else 'FAIL'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--solver-repeats", type=int, default=50)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--resnet-on-cpu", action="store_true")
    p.add_argument("--skip-solver", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    if not args.skip_solver:
        print("\n".join(bench_solver(args.solver_repeats)), flush=True)
    print("\n".join(bench_steps("mlp", torch.device("cpu"), args.repeats, 5)), flush=True)
    if torch.cuda.is_available():
        print("\n".join(bench_steps("preact_resnet18", torch.device("cuda"), args.repeats, 5)), flush=True)
    elif args.resnet_on_cpu:
        print("\n".join(bench_steps("preact_resnet18", torch.device("cpu"), 5, 1)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
