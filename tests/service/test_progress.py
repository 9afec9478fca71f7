"""The train command's progress line."""

from __future__ import annotations

import io

from service.progress import ProgressPrinter, format_progress
from workers.report import JobReport


def test_progress_line_shows_rate_lag_loss_accuracy_and_stalls() -> None:
    line = format_progress(JobReport(step=1200, examples=153600, records_per_s=15321.4, lag=4096, loss=0.5123,
                                     prequential_accuracy=0.812, eval_accuracy=float("nan"), rejected=3,
                                     checkpoint_step=1200))
    assert line == ("step 1,200 | 153,600 records | 15,321 rec/s | lag 4,096 | loss 0.512 | acc 81.2% | "
                    "3 dead-lettered | checkpoint @1,200")
    stalled = format_progress(JobReport(step=5, examples=10, stalled_s=12.2, stall_reason="timed out"))
    assert stalled.endswith("STALLED 12 s: timed out")
    postponed = format_progress(JobReport(step=7, examples=70, checkpoint_postponed="2 dead letter(s) not delivered"))
    assert postponed.endswith("checkpoint postponed: 2 dead letter(s) not delivered")
    reset = format_progress(JobReport(step=7, examples=70, offset_resets=1))
    assert reset.endswith("1 offset reset(s), see the log")


def test_printer_redraws_on_a_terminal_and_throttles_in_logs() -> None:
    tty = io.StringIO()
    printer = ProgressPrinter(tty, tty=True)
    printer(JobReport(step=10, examples=100))
    printer(JobReport(step=2, examples=2))
    printer.close()
    assert tty.getvalue() == "\rstep 10 | 100 records\rstep 2 | 2 records   \n"

    now = [0.0]
    log = io.StringIO()
    printer = ProgressPrinter(log, tty=False, every_s=5.0, clock=lambda: now[0])
    printer(JobReport(step=1, examples=1))
    now[0] = 1.0
    printer(JobReport(step=2, examples=2))  # too soon: dropped
    printer(JobReport(step=3, examples=3, checkpoint_step=3))  # notable: kept
    printer(JobReport(step=4, examples=4, final=True))  # the last one: kept
    now[0] = 9.0
    printer(JobReport(step=5, examples=5))
    assert [line.split(" |")[0] for line in log.getvalue().splitlines()] == ["step 1", "step 3", "step 4", "step 5"]
