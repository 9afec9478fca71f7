"""What every rank decides alike: before each step, and at each checkpoint about dead letters.

Each rank's clock, broker connection and stop request can disagree; a rank acting on its own
view would skip a collective the others enter and leave them waiting until Ray tears the job
down. So each rank's signals are summed over ranks in one collective, and any rank's trigger
counts for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

from ..errors import DeadLetterError, DeadLettersPending
from ..kafka.delivery import DeliverySink
from .collectives import Collectives


@dataclass(frozen=True)
class StepSignals:
    """This rank's view before a step (each field one number of the step's all-reduce)."""

    examples: int  # rows of this rank's batch
    source_open: bool  # False once a bounded source is done
    rejected: int  # records of the batch sent to the dead-letter topic
    checkpoint_time_due: bool  # checkpoint.every_s has passed on this rank's clock
    stalled: bool  # this rank's broker connection is stalled
    past_deadline: bool  # ... for longer than source.stall_deadline_s
    stop: bool  # a stop was requested (rank 0 asks the channel)
    idle_report_due: bool  # no report for IDLE_REPORT_EVERY_S on this rank's clock
    dead_letters_refused: bool  # the broker refused one of this rank's dead letters for good


@dataclass(frozen=True)
class StepDecision:
    """The signals of every rank combined: counts summed, flags true when any rank's is."""

    examples: int
    open_sources: int
    rejected: int
    checkpoint_time_due: bool
    stalled: bool
    past_deadline: bool
    stop: bool
    idle_report_due: bool
    dead_letters_refused: bool

    @classmethod
    def agree(cls, collectives: Collectives, mine: StepSignals) -> StepDecision:
        """One all-reduce of a small vector: the only collective of a step besides training's."""
        s = dict(zip([f.name for f in fields(StepSignals)], collectives.sum([float(v) for v in astuple(mine)]),
                     strict=True))
        return cls(examples=int(s["examples"]), open_sources=int(s["source_open"]), rejected=int(s["rejected"]),
                   checkpoint_time_due=s["checkpoint_time_due"] > 0, stalled=s["stalled"] > 0,
                   past_deadline=s["past_deadline"] > 0, stop=s["stop"] > 0, idle_report_due=s["idle_report_due"] > 0,
                   dead_letters_refused=s["dead_letters_refused"] > 0)

    @property
    def done(self) -> bool:
        """No rank has records and every source is done."""
        return self.examples == 0 and self.open_sources == 0


@dataclass(frozen=True)
class DeadLetterStatus:
    """Why this rank's dead letters are not all safe, if they are not: still queued (the broker
    is unreachable; they may yet be delivered) or refused (ACL, missing topic: for good)."""

    pending: str | None = None
    refused: str | None = None

    @classmethod
    def after_flush(cls, sinks: DeliverySink | Sequence[DeliverySink], timeout_s: float) -> DeadLetterStatus:
        """Flush ``sinks`` (dead letters, suspects) for up to ``timeout_s`` and say what is left:
        the first refusal, else the first still pending."""
        pending = None
        for sink in [sinks] if isinstance(sinks, DeliverySink) else sinks:
            try:
                sink.flush(timeout_s)
            except DeadLettersPending as exc:
                pending = pending or str(exc)
            except DeadLetterError as exc:
                return cls(refused=str(exc))
        return cls(pending=pending)

    def agree(self, collectives: Collectives) -> DeadLetterStatus:
        """Every rank's status combined (one all-reduce; the reasons are gathered only when some
        rank has one), so every rank acts alike and names the same reason."""
        pending, refused = collectives.sum([float(self.pending is not None), float(self.refused is not None)])
        if not pending and not refused:
            return DeadLetterStatus()
        statuses = collectives.gather(self)
        return DeadLetterStatus(pending=_first(collectives, [s.pending for s in statuses]),
                                refused=_first(collectives, [s.refused for s in statuses]))

    def raise_if_refused(self) -> None:
        """Fail (on every rank, after :meth:`agree`) when the broker refused a dead letter:
        retrying cannot help, and a checkpoint past it would lose the record."""
        if self.refused is not None:
            raise DeadLetterError(f"{self.refused}; the job stops without a checkpoint past these records, so "
                                  "a rerun (once the dead-letter topic accepts them) routes them again")


def first_refusal(sinks: Sequence[DeliverySink]) -> str | None:
    """The first refusal any of this rank's sinks saw since its last flush (never waits)."""
    return next((r for r in (sink.refused() for sink in sinks) if r is not None), None)


def refused_anywhere(collectives: Collectives, mine: str | None) -> str:
    """The broker's refusal that some rank saw, as every rank names it (one gather; call on every
    rank once the step's decision says some rank has one)."""
    return _first(collectives, collectives.gather(mine)) or "another rank's dead letters were refused"


def _first(collectives: Collectives, reasons: list[str | None]) -> str | None:
    for rank, reason in enumerate(reasons):
        if reason is not None:
            return f"rank {rank}: {reason}" if collectives.distributed else reason
    return None
