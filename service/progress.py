"""The foreground job's progress line: records/s, lag, loss and accuracy from each report.

On a terminal one line is redrawn in place; otherwise (logs, CI) a line is written at most every
``every_s`` seconds, and always for checkpoints, evaluations and stalls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from workers.report import JobReport


def format_progress(r: JobReport) -> str:
    """One line from a report; fields the report lacks (None) are left out."""
    parts = [f"step {r.step:,}", f"{r.examples:,} records"]
    if r.records_per_s is not None:
        parts.append(f"{r.records_per_s:,.0f} rec/s")
    if r.lag is not None:
        parts.append(f"lag {r.lag:,}")
    for value, label, fmt in ((r.loss, "loss", "{:.3f}"), (r.prequential_accuracy, "acc", "{:.1%}"),
                              (r.eval_accuracy, "eval", "{:.1%}")):
        if value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    if r.rejected:
        parts.append(f"{r.rejected:,} dead-lettered")
    if r.offset_resets:
        parts.append(f"{r.offset_resets} offset reset(s), see the log")
    if r.checkpoint_step is not None:
        parts.append(f"checkpoint @{r.checkpoint_step:,}")
    if r.checkpoint_postponed:
        parts.append(f"checkpoint postponed: {r.checkpoint_postponed}")
    if r.stalled_s:
        parts.append(f"STALLED {r.stalled_s:.0f} s: {r.stall_reason or 'broker unreachable'}")
    return " | ".join(parts)


def is_notable(r: JobReport) -> bool:
    """Reports printed to a log even between the throttled ones."""
    return (r.checkpoint_step is not None or bool(r.checkpoint_postponed) or r.eval_accuracy is not None
            or bool(r.stalled_s) or r.final)


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

    def __call__(self, report: JobReport) -> None:
        line = format_progress(report)
        if self._tty:
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            if not is_notable(report) and self._clock() - self._last < self._every_s:
                return
            self._stream.write(line + "\n")
        self._last = self._clock()
        self._stream.flush()

    def close(self) -> None:
        """End the redrawn line so what follows starts on its own."""
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
