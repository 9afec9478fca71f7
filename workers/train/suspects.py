"""A review queue for suspect labels: records the CICW weights distrust, published for a person.

After burn-in (and ``suspects.after_steps`` more steps), every trained record whose normalised
instance weight N*w (N: the step's global batch size; 1 is an average record) is below
``suspects.max_weight`` goes to the suspects topic, its key and value unchanged so a reviewer
sees the input, with headers (then the record's own headers):

- ``cicw.suspect.label``: the given label (a probability row's most likely class);
- ``cicw.suspect.predicted`` and ``cicw.suspect.probability``: the model's class and its softmax
  probability, from the step's forward pass before the update (absent when not forwarded);
- ``cicw.suspect.weight`` (N*w) and ``cicw.suspect.step`` (the job's step that trained it);
- ``cicw.suspect.source.topic``, ``.partition``, ``.offset``: the record's identity, and
  ``cicw.suspect.source``: the source it names (codec ``source_field``, as label quality reads it).

Delivery follows the dead letters' rule (workers.kafka.delivery): a checkpoint counting the
records as consumed is written only once their suspects are delivered; after a restart the
records after the last checkpoint are trained, and may be published, again: at least once, a
reader dedupes on the source coordinates. Each rank publishes its own records' suspects.

Where records carry the clean-label header, the job counts how many suspects were truly
mislabelled (precision) and how many of the mislabelled records trained while publishing were
published (recall), over its life (checkpointed in :class:`SuspectTotals`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..kafka.codecs import UNKNOWN_SOURCE, DecodedBatch
from ..kafka.delivery import DeliverySink
from ..kafka.producing import Producer
from ..kafka.records import KafkaRecord
from ..spec import SuspectsSpec

LABEL_HEADER = "cicw.suspect.label"
PREDICTED_HEADER = "cicw.suspect.predicted"
PROBABILITY_HEADER = "cicw.suspect.probability"
WEIGHT_HEADER = "cicw.suspect.weight"
STEP_HEADER = "cicw.suspect.step"
TOPIC_HEADER = "cicw.suspect.source.topic"
PARTITION_HEADER = "cicw.suspect.source.partition"
OFFSET_HEADER = "cicw.suspect.source.offset"
SOURCE_HEADER = "cicw.suspect.source"
# The counts a window sums over ranks, in this order (see SuspectTotals).
SUMMED = ("published", "known", "noisy", "corrupted")


@dataclass(frozen=True)
class Suspect:
    """One row of a step's batch below the threshold."""

    row: int
    label: int
    weight: float  # N*w
    predicted: int | None
    probability: float | None


def select_suspects(*, targets: Tensor, logits: Tensor | None, weights: Tensor, global_examples: int,
                    max_weight: float) -> list[Suspect]:
    """The rows whose N*w (``weights`` this rank's share of the global instance weights, N =
    ``global_examples``) is below ``max_weight``, with their given label ([n] class indices, or
    the most likely class of [n, K] rows) and the model's prediction (``logits`` [n, K] or None)."""
    nw = weights.detach().double().cpu() * global_examples
    rows = torch.nonzero(nw < max_weight).flatten()
    if rows.numel() == 0:
        return []
    given = targets.detach().cpu()
    labels = (given if given.dim() == 1 else given.argmax(1))[rows].tolist()
    predicted: list[int | None] = [None] * len(labels)
    probability: list[float | None] = [None] * len(labels)
    if logits is not None:
        probs = torch.softmax(logits.detach().double().cpu()[rows], dim=1)
        best = probs.max(1)
        predicted, probability = list(best.indices.tolist()), list(best.values.tolist())
    return [Suspect(int(r), int(k), float(nw[r]), p, q)
            for r, k, p, q in zip(rows.tolist(), labels, predicted, probability, strict=True)]


def suspect_headers(record: KafkaRecord, suspect: Suspect, *, step: int, source: str) -> list[tuple[str, bytes]]:
    """The headers of ``record``'s suspect record (module docstring), its own headers after them."""
    headers = [(LABEL_HEADER, str(suspect.label).encode())]
    if suspect.predicted is not None and suspect.probability is not None:
        headers += [(PREDICTED_HEADER, str(suspect.predicted).encode()),
                    (PROBABILITY_HEADER, f"{suspect.probability:.6g}".encode())]
    headers += [(WEIGHT_HEADER, f"{suspect.weight:.6g}".encode()), (STEP_HEADER, str(step).encode()),
                (TOPIC_HEADER, record.topic.encode()), (PARTITION_HEADER, str(record.partition).encode()),
                (OFFSET_HEADER, str(record.offset).encode()), (SOURCE_HEADER, source.encode())]
    return [*headers, *record.headers]


def trained_records(records: Sequence[KafkaRecord], batch: DecodedBatch) -> list[KafkaRecord]:
    """The records behind the batch's rows, in row order: ``records`` less the rejected ones."""
    rejected = {(r.record.topic, r.record.partition, r.record.offset) for r in batch.rejected}
    return [r for r in records if (r.topic, r.partition, r.offset) not in rejected]


@dataclass
class SuspectTotals:
    """Over the job's life (checkpointed, the same on every rank): suspects ``published``;
    ``known`` of them with a clean-label header, ``noisy`` of those given a wrong label; and
    ``corrupted``: records with a wrong label (by the header) trained on publishing steps."""

    published: int = 0
    known: int = 0
    noisy: int = 0
    corrupted: int = 0

    def add(self, sums: Sequence[float]) -> None:
        """Add a window's counts over all ranks, in SUMMED order."""
        for name, value in zip(SUMMED, sums, strict=True):
            setattr(self, name, getattr(self, name) + int(value))

    def report(self) -> dict[str, float | int | None]:
        """The JobReport fields suspects_published, suspects_precision and suspects_recall."""
        return {"suspects_published": self.published,
                "suspects_precision": self.noisy / self.known if self.known else None,
                "suspects_recall": self.noisy / self.corrupted if self.corrupted else None}

    def as_payload(self) -> list[int]:
        return [getattr(self, name) for name in SUMMED]

    @classmethod
    def from_payload(cls, payload: object) -> SuspectTotals:
        """Read :meth:`as_payload` back; raises CheckpointError when it is malformed."""
        if (not isinstance(payload, list) or len(payload) != len(SUMMED)
                or not all(type(v) is int and v >= 0 for v in payload)):
            raise CheckpointError(f"checkpoint suspects must be {len(SUMMED)} non-negative integers {list(SUMMED)}")
        totals = cls(*payload)
        if totals.noisy > min(totals.known, totals.corrupted) or totals.known > totals.published:
            raise CheckpointError(f"checkpoint suspects are inconsistent: {totals}")
        return totals


class SuspectPublisher:
    """One rank's suspects: selects them at each step, sends them, counts them until the next
    report. Its sink joins the dead letters' at every checkpoint and step (see loop.py)."""

    def __init__(self, spec: SuspectsSpec, *, source_topic: str, burn_in_steps: int, producer: Producer) -> None:
        self.spec, self.topic = spec, spec.topic_for(source_topic)
        self.first_step = burn_in_steps + spec.after_steps + 1  # the job's step counter is 1-based
        self.sink = DeliverySink(producer, "suspect record")
        self.window = [0] * len(SUMMED)

    def observe(self, *, step: int, records: Sequence[KafkaRecord] | None, batch: DecodedBatch, targets: Tensor,
                logits: Tensor | None, weights: Tensor, global_examples: int, weights_active: bool) -> int:
        """Publish the suspects of the step ``step`` (1-based) of this rank's ``batch`` (from
        ``records``); returns how many. Nothing before burn-in ends plus after_steps."""
        if not weights_active or step < self.first_step or records is None or len(batch) == 0:
            return 0
        clean = batch.clean_labels.detach().cpu().long()
        given = targets.detach().cpu()
        given = given.long() if given.dim() == 1 else given.argmax(1)
        wrong = (clean >= 0) & (clean != given)
        self.window[3] += int(wrong.sum())
        found = select_suspects(targets=targets, logits=logits, weights=weights, global_examples=global_examples,
                                max_weight=self.spec.max_weight)
        if not found:
            return 0
        rows = trained_records(records, batch)
        assert len(rows) == len(batch), "decode_batch keeps every record as a row or a rejection"
        sources = batch.sources if len(batch.sources) == len(batch) else [UNKNOWN_SOURCE] * len(batch)
        for s in found:
            record = rows[s.row]
            self.sink.produce(self.topic, record.value, record.key,
                              suspect_headers(record, s, step=step, source=sources[s.row]))
            known = int(clean[s.row]) >= 0
            self.window[0] += 1
            self.window[1] += known
            self.window[2] += bool(wrong[s.row])
        return len(found)

    def take_window(self) -> list[int]:
        """This rank's counts since the last call, in SUMMED order (for the report's all-reduce)."""
        window, self.window = self.window, [0] * len(SUMMED)
        return window
