"""The foreground job's progress line: records/s, lag, loss and accuracy from each report.

On a terminal one line is redrawn in place; otherwise (logs, CI) a line is written at most every
``every_s`` seconds, and always for checkpoints, evaluations and stalls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TextIO


def format_progress(m: dict[str, Any]) -> str:
    """One line from a report's metrics; fields a report lacks are left out."""
    parts = [f"step {m.get('step', 0):,}", f"{m.get('examples', 0):,} records"]
    rate = m.get("records_per_s")
    if isinstance(rate, float) and math.isfinite(rate):
        parts.append(f"{rate:,.0f} rec/s")
    if m.get("lag") is not None:
        parts.append(f"lag {m['lag']:,}")
    for key, label, fmt in (("loss", "loss", "{:.3f}"), ("prequential_accuracy", "acc", "{:.1%}"),
                            ("eval_accuracy", "eval", "{:.1%}")):
        value = m.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{label} {fmt.format(value)}")
    if m.get("rejected"):
        parts.append(f"{m['rejected']:,} dead-lettered")
    if m.get("checkpoint_step") is not None:
        parts.append(f"checkpoint @{m['checkpoint_step']:,}")
    if m.get("checkpoint_postponed"):
        parts.append(f"checkpoint postponed: {m['checkpoint_postponed']}")
    if m.get("stalled_s"):
        parts.append(f"STALLED {m['stalled_s']:.0f} s: {m.get('stall_reason', 'broker unreachable')}")
    return " | ".join(parts)


# Reports printed to a log even between the throttled ones.
NOTABLE = ("checkpoint_step", "checkpoint_postponed", "eval_accuracy", "stalled_s", "final")


class ProgressPrinter:
    """Callable on each report (see ``workers.runner.run_job(on_report=...)``)."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._every_s = every_s
        self._clock = clock
        self._last = float("-inf")
        self._width = 0

    def __call__(self, metrics: dict[str, Any]) -> None:
        line = format_progress(metrics)
        if self._tty:
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            notable = any(metrics.get(k) for k in NOTABLE)
            if not notable and self._clock() - self._last < self._every_s:
                return
            self._stream.write(line + "\n")
        self._last = self._clock()
        self._stream.flush()

    def close(self) -> None:
        """End the redrawn line so what follows starts on its own."""
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
