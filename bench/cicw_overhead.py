"""What CICW costs: the class-weight solve against a generic convex solver, and whole training
steps against cross entropy, all measured side by side in one run.

(a) Per-batch time of cicw.class_reweighted_loss (KL, gamma 0.01) against the same problems
    solved with cvxpy the way the reference implementation does it: one cvxpy Problem per batch
    (a variable [n, K] with one KL constraint per row), built and solved anew for every batch.
    n = 128, K = 10 and 100, one-hot and soft (mixup-like, two labelled classes) targets. The
    answers are compared too (max |L_cicw - L_cvxpy| over the batch). Our cvxpy formulation puts
    the KL constraint on each row's label support only (the exact problem), which is smaller and
    faster than the reference's 1e-6-smoothed log over all K classes, so the speed-up is
    conservative.
(b) Optimizer-step time of CE, mixup, CIW, CICW and CICW-M (cicw.CICWLoss after burn-in), as
    ratios to a plain PyTorch CE step (F.cross_entropy) measured in the same run. CICW-M
    forwards the clean batch without gradient and then forwards and backpropagates the mixed
    batch, so it is also compared with an explicit "CE + mixed fwd/bwd" step (a CE step plus one
    more forward and backward of a batch of the same size). Methods are interleaved across
    repeats, in a rotating order, so drift in machine speed hits them all alike.

    python bench/cicw_overhead.py           # (a), MLP on CPU, PreAct ResNet-18 (CUDA if present, else a few CPU steps)
    python bench/cicw_overhead.py --quick   # fewer repeats, no PreAct ResNet-18 on the CPU
    python bench/cicw_overhead.py --profile cicw_m   # torch.profiler table for one method's MLP step

Targets (printed as PASS/FAIL lines; nothing is asserted): >= 1000x faster than cvxpy at K = 100
with the same answer (max |dL| <= 1e-4); CIW and CICW steps within 5% of the CE step; CICW-M
within 5% of the CE + mixed fwd/bwd step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from machine_info import cpu_name  # bench/ is on sys.path when a bench script runs

import cicw
from workers.train.models import build_model

GAMMA = 0.01
N = 128
SAME_ANSWER_TOL = 1e-4
SPEEDUP_TARGET = 1000.0
STEP_TARGET = 1.05
STEP_METHODS = ("plain_ce", "ce", "mixup", "ciw", "cicw", "cicw_m", "ce+mixed")


# ---------------------------------------------------------------------------------------------
# (a) the class-weight solve


def soft_targets(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Mixup-like targets: r * onehot(a) + (1 - r) * onehot(b), r ~ Beta(2, 2), a != b mostly."""
    a, b = torch.randint(0, k, (2, n), generator=g)
    r = torch.distributions.Beta(2.0, 2.0).sample((n, 1))
    return r * F.one_hot(a, k) + (1 - r) * F.one_hot(b, k)


def cvxpy_inner_losses(losses: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """min_v sum_k v_ik l_ik s.t. v_i on the simplex, KL(y_i || v_i) <= gamma, for every row i,
    as one cvxpy Problem over the batch (the exact problem: relative entropy on each row's label
    support). losses, y: [n, K]. Returns the inner losses [n]."""
    import cvxpy as cp
    import scipy.sparse as sp

    n, k = losses.shape
    rows, cols = np.nonzero(y > 0)
    # Sums the per-entry relative entropies of each row: [n, nnz] with a 1 per labelled entry.
    row_sum = sp.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n, len(rows)))
    v = cp.Variable((n, k), nonneg=True)
    constraints = [cp.sum(v, axis=1) == 1,
                   row_sum @ cp.rel_entr(y[rows, cols], v[rows, cols]) <= gamma]
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(losses, v))), constraints)
    problem.solve(solver=cp.CLARABEL)
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"cvxpy: {problem.status}")
    return (np.asarray(v.value) * losses).sum(1)


def cvxpy_reference_form(losses: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """The formulation the reference implementation solves every batch (written from its math):
    the KL constraint as sum_k y_k (log(y_k + 1e-6) - log(v_k + 1e-6)) over all K classes, cvxpy's
    default solver. A slightly different (smoothed) and larger problem: for timing context only."""
    import cvxpy as cp

    v = cp.Variable(losses.shape)
    kl = cp.sum(cp.multiply(y, np.log(y + 1e-6) - cp.log(v + 1e-6)), axis=1)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(v, losses))),
                         [v >= 0, cp.sum(v, axis=1) == 1, kl <= gamma])
    problem.solve()
    return (np.asarray(v.value) * losses).sum(1)


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ops_per_call(fn: Callable[[], object]) -> int:
    """aten ops one call dispatches (nested ones included: each costs dispatcher time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def cuda_kernels_per_call(fn: Callable[[], object]) -> int:
    """CUDA kernels one call launches (the same call on CUDA tensors)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def bench_solver(repeats: int, cvxpy_repeats: int) -> list[str]:
    lines = [f"(a) class_reweighted_loss vs cvxpy, n={N}, KL gamma={GAMMA}. cicw: float32 on the CPU, "
             f"median of {repeats} calls. cvxpy: build + solve of one Problem per batch, median of "
             f"{cvxpy_repeats}; 'exact' = the same problem (Clarabel), 'ref-form' = the reference's "
             f"1e-6-smoothed formulation over all K (default solver), for context. max|dL|: cicw "
             f"(float32 / float64 input) against 'exact'. ops: aten ops per cicw call (CPU, "
             f"torch.profiler); kernels: CUDA kernel launches per call on CUDA tensors (n/a without CUDA).",
             f"{'K':>4} {'targets':>8} {'cicw ms':>8} {'exact ms':>9} {'speed-up':>9} {'ref-form ms':>12} "
             f"{'speed-up':>9} {'max|dL| f32':>12} {'max|dL| f64':>12} {'ops':>5} {'kernels':>8}"]
    verdicts = []
    g = torch.Generator().manual_seed(0)
    for k in (10, 100):
        for kind in ("one-hot", "soft"):
            logits = torch.randn(N, k, generator=g) * 3
            lp32 = torch.log_softmax(logits, -1)
            lp64 = lp32.double()
            y = torch.randint(0, k, (N,), generator=g) if kind == "one-hot" else soft_targets(N, k, g)

            def ours(lp: torch.Tensor = lp32, y: torch.Tensor = y) -> torch.Tensor:
                return cicw.class_reweighted_loss(lp, y, gamma=GAMMA, validate_args=False)

            ours_s = _median_seconds(ours, repeats, warmup=5)
            y_dense = (F.one_hot(y, k) if kind == "one-hot" else y).double().numpy()
            losses64 = (-lp64).numpy()
            exact_s = _median_seconds(lambda l=losses64, t=y_dense: cvxpy_inner_losses(l, t, GAMMA),  # type: ignore[misc]
                                      cvxpy_repeats, warmup=1)
            ref_s = _median_seconds(lambda l=losses64, t=y_dense: cvxpy_reference_form(l, t, GAMMA),  # type: ignore[misc]
                                    cvxpy_repeats, warmup=0)
            ref = cvxpy_inner_losses(losses64, y_dense, GAMMA)
            y64 = y if kind == "one-hot" else y.double()
            d32 = float(np.max(np.abs(ref - ours().double().numpy())))
            d64 = float(np.max(np.abs(ref - ours(lp64, y64).numpy())))
            kernels = "n/a"
            if torch.cuda.is_available():
                lp_dev, y_dev = lp32.cuda(), y.cuda()
                kernels = str(cuda_kernels_per_call(lambda a=lp_dev, b=y_dev: ours(a, b)))  # type: ignore[misc]
            lines.append(f"{k:>4} {kind:>8} {ours_s * 1e3:>8.3f} {exact_s * 1e3:>9.1f} {exact_s / ours_s:>8.0f}x "
                         f"{ref_s * 1e3:>12.1f} {ref_s / ours_s:>8.0f}x {d32:>12.1e} {d64:>12.1e} "
                         f"{ops_per_call(ours):>5} {kernels:>8}")
            if k == 100:
                same = max(d32, d64) <= SAME_ANSWER_TOL
                for label, seconds in (("exact", exact_s), ("ref-form", ref_s)):
                    speedup = seconds / ours_s
                    ok = speedup >= SPEEDUP_TARGET and same
                    verdicts.append(f"target K=100 {kind}: >= {SPEEDUP_TARGET:.0f}x faster than cvxpy ({label}) "
                                    f"with max|dL| <= {SAME_ANSWER_TOL:g}: {speedup:.0f}x, {max(d32, d64):.1e} "
                                    f"{'PASS' if ok else 'FAIL'}")
    return lines + verdicts


# ---------------------------------------------------------------------------------------------
# (b) whole training steps


def make_step(method: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, k: int) -> Callable[[], None]:
    if method == "plain_ce":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    if method == "ce+mixed":
        # A CE step plus one more forward and backward of a batch of the same size: the budget
        # CICW-M is held to (CICW-M's clean forward has no backward, so it should come in under).
        x2 = x.flip(0)
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            F.cross_entropy(model(x2), y).backward()
            opt.step()
        return step
    # gate="steps", burn_in_steps=0: every timed step is a reweighting step (annealing changes
    # only lambda); under the memorization gate a shut gate's step is a CE step.
    cfg = cicw.CICWConfig(method=method, lam=2.5 if method == "cicw_m" else 0.1,  # type: ignore[arg-type]
                          gate="steps", gamma=GAMMA, burn_in_steps=0, anneal_steps=0, validate_args=False)
    loss_fn = cicw.CICWLoss(cfg, num_classes=k, generator=torch.Generator(device=x.device).manual_seed(0))
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).loss.backward()
        opt.step()
        loss_fn.step()
    return step


def _setup(name: str, device: torch.device,
           ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    in_shape = (1, 28, 28) if name == "mlp" else (3, 32, 32)
    model = build_model(name, in_shape=in_shape, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(N, *in_shape, device=device)
    y = torch.randint(0, 10, (N,), device=device)
    return model, opt, x, y


def bench_steps(name: str, device: torch.device, repeats: int, inner: int, warmup: int) -> list[str]:
    model, opt, x, y = _setup(name, device)
    steps = {m: make_step(m, model, opt, x, y, 10) for m in STEP_METHODS}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in STEP_METHODS:
        for _ in range(warmup):
            steps[m]()
    sync()
    times: dict[str, list[float]] = {m: [] for m in STEP_METHODS}
    for r in range(repeats):
        shift = r % len(STEP_METHODS)
        for m in STEP_METHODS[shift:] + STEP_METHODS[:shift]:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[m]()
            sync()
            times[m].append((time.perf_counter() - t0) / inner)
    med = {m: statistics.median(v) for m, v in times.items()}
    ce = med["plain_ce"]
    lines = [f"(b) step time, {name} on {device.type}, batch {N}, SGD Nesterov "
             f"(median of {repeats} repeats x {inner} steps, methods interleaved)",
             f"{'method':>10} {'ms/step':>10} {'/ CE':>7} {'/ CE+mixed':>11}"]
    for m in STEP_METHODS:
        lines.append(f"{m:>10} {med[m] * 1e3:>10.2f} {med[m] / ce:>7.3f} {med[m] / med['ce+mixed']:>11.3f}")
    for m in ("ciw", "cicw"):
        ratio = med[m] / ce
        lines.append(f"target {name} {m} <= {STEP_TARGET} x CE step: {ratio:.3f} "
                     f"{'PASS' if ratio <= STEP_TARGET else 'FAIL'}")
    ratio = med["cicw_m"] / med["ce+mixed"]
    lines.append(f"target {name} cicw_m <= {STEP_TARGET} x (CE + mixed fwd/bwd) step: {ratio:.3f} "
                 f"{'PASS' if ratio <= STEP_TARGET else 'FAIL'}")
    return lines


def profile_step(method: str, name: str, device: torch.device, steps: int) -> str:
    """torch.profiler table (self CPU time) of `steps` steps of one method."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, x, y = _setup(name, device)
    step = make_step(method, model, opt, x, y, 10)
    for _ in range(5):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def machine() -> str:
    cpu = cpu_name()
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), CUDA: {cuda}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    p.add_argument("--quick", action="store_true", help="fewer repeats; skip PreAct ResNet-18 on the CPU")
    p.add_argument("--solver-repeats", type=int, default=None, help="timed calls of class_reweighted_loss")
    p.add_argument("--cvxpy-repeats", type=int, default=None, help="timed cvxpy solves (slow)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds of MLP steps")
    p.add_argument("--skip-solver", action="store_true", help="skip (a)")
    p.add_argument("--skip-steps", action="store_true", help="skip (b)")
    p.add_argument("--profile", metavar="METHOD", choices=STEP_METHODS,
                   help="only print a torch.profiler table of this method's MLP step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    solver_repeats = args.solver_repeats or (50 if quick else 200)
    cvxpy_repeats = args.cvxpy_repeats or (1 if quick else 3)
    repeats = args.repeats or (10 if quick else 30)
    print(machine(), flush=True)
    if args.profile:
        print(profile_step(args.profile, "mlp", torch.device("cpu"), 50))
        return 0
    if not args.skip_solver:
        print("\n".join(bench_solver(solver_repeats, cvxpy_repeats)), flush=True)
    if not args.skip_steps:
        print("\n".join(bench_steps("mlp", torch.device("cpu"), repeats, inner=5, warmup=3)), flush=True)
        if torch.cuda.is_available():
            print("\n".join(bench_steps("preact_resnet18", torch.device("cuda"), repeats, inner=5, warmup=3)),
                  flush=True)
        elif not quick:
            print("\n".join(bench_steps("preact_resnet18", torch.device("cpu"), 3, inner=1, warmup=1)), flush=True)
        else:
            print("(b) preact_resnet18: skipped (--quick, no CUDA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
