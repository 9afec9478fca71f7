"""Tables from several bench/noisy_accuracy.py runs at once (their results.json files): for a
table whose rows were measured in separate runs, e.g. methods a change left alone and methods it
changed, or further seeds.

Example:
    python bench/noisy_tables.py docs/noisy_accuracy/stream/results.json out/more_seeds/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from noisy_accuracy import METHODS, RunResult, Setting, markdown_table, parse_settings


def load(paths: list[str]) -> list[RunResult]:
    """Every run of the files; a later file's run of the same (method, setting, seed) wins."""
    runs: dict[tuple[str, str, int], RunResult] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            curve = [tuple(c) for c in row.get("curve", [])]
            peak = max(curve, key=lambda c: (c[1], -c[0])) if curve else (0, row["final_test_acc"], 0.0)
            row = {"weights_from_step": None, "peak_test_acc": peak[1], "peak_step": peak[0], **row}
            run = RunResult(**row)
            runs[(run.method, run.setting, run.seed)] = run
    return list(runs.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files of bench/noisy_accuracy.py")
    p.add_argument("--settings", default="none:0,symmetric:0.2,symmetric:0.4,symmetric:0.6,symmetric:0.8,"
                   "uniform:0.4,asymmetric:0.4")
    p.add_argument("--seeds", default="", help="only these seeds, e.g. 0,1 (default: all)")
    args = p.parse_args(argv)
    runs = load(args.results)
    if args.seeds:
        keep = {int(s) for s in args.seeds.split(",")}
        runs = [r for r in runs if r.seed in keep]
    settings: list[Setting] = parse_settings(args.settings)
    methods = [m for m in METHODS if any(r.method == m for r in runs)]
    seeds = sorted({r.seed for r in runs})
    print(f"seeds {seeds}; final clean test accuracy (%), mean ± half-range over seeds\n")
    print(markdown_table(runs, "final_test_acc", settings, methods))
    print("\npeak clean test accuracy (%) during training [mean step of the peak]\n")
    print(markdown_table(runs, "peak_test_acc", settings, methods, step_key="peak_step"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
