"""Interleaved A/B timing of class_reweighted_loss across commits, for a machine whose other load
makes absolute times meaningless: each commit's ``cicw/`` is imported side by side in this one
process and timed in rotation, so load drift hits them all alike; report ratios.

    python bench/cicw_ab.py 5cc2bd2 1f116dc            # those commits' cicw/ against the work tree's
    python bench/cicw_ab.py 5cc2bd2 --rounds 40 --k 100

Case: KL gamma 0.01, n = 128, float32 log-probs, mixup-like soft targets (cicw_overhead.py's
soft_targets), one torch thread. Prints aten ops per call and the median and minimum over rounds
of the per-call time (each round times 20 calls), with ratios to the first version named.
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cicw_overhead import GAMMA, N, ops_per_call, soft_targets  # bench/ is on sys.path

import cicw

CALLS_PER_ROUND = 20


def import_cicw_at(commit: str, into: Path) -> object:
    """The package cicw/ as of ``commit``, importable as cicw_<commit> (its imports are relative)."""
    name = f"cicw_{commit}"
    archive = subprocess.run(["git", "archive", commit, "cicw"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into / "unpack", filter="data")
    (into / "unpack" / "cicw").rename(into / name)
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commits", nargs="+", help="commits whose cicw/ to time against the work tree's")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(N, args.k, generator=g) * 3, -1)
    y = soft_targets(N, args.k, g)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        versions = {c: import_cicw_at(c, Path(tmp)) for c in args.commits}
        versions["work tree"] = cicw
        calls: dict[str, Callable[[], object]] = {
            name: (lambda m=module: m.class_reweighted_loss(lp, y, gamma=GAMMA, validate_args=False))  # type: ignore[misc]
            for name, module in versions.items()}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            for _ in range(CALLS_PER_ROUND):
                call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                t0 = time.perf_counter()
                for _ in range(CALLS_PER_ROUND):
                    call()
                times[name].append((time.perf_counter() - t0) / CALLS_PER_ROUND)
        first = args.commits[0]
        print(f"class_reweighted_loss, KL gamma={GAMMA}, n={N}, K={args.k}, soft targets, float32, 1 thread, "
              f"{args.rounds} rounds x {CALLS_PER_ROUND} calls")
        print(f"{'version':>12} {'ops':>5} {'median ms':>10} {'min ms':>8} {'median ratio':>13} {'min ratio':>10}")
        for name, ts in times.items():
            print(f"{name:>12} {ops_per_call(calls[name]):>5} {statistics.median(ts) * 1e3:>10.3f} "
                  f"{min(ts) * 1e3:>8.3f} {statistics.median(ts) / statistics.median(times[first]):>13.2f} "
                  f"{min(ts) / min(times[first]):>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
