"""The ``cicw-stream`` command line. Subcommands import what they need lazily, so ``--help`` is fast
and a subcommand never pulls in HTTP code it does not use."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("cicw-stream")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _moons(args: argparse.Namespace) -> int:
    from cicw.examples import two_moons

    return two_moons.main(["--out", args.out, "--seed", str(args.seed)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cicw-stream",
        description="Continuous training on noisy-labelled streams with CICW.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    moons = sub.add_parser("moons", help="two-moons illustration: CE against CIW under 30%% label noise")
    moons.add_argument("--out", default="moons.png", help="PNG to write (default: moons.png)")
    moons.add_argument("--seed", type=int, default=0)
    moons.set_defaults(run=_moons)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
