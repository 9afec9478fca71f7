"""A clean evaluation set scored every N steps while the job streams: read once at start, from a
topic (through the job's own codec, so preprocessing matches training exactly) or an npz file.
Each rank holds and scores its share; the loop sums the counts over ranks.

A bad record on the evaluation topic never fails the job: it is left out of the set and
returned as a rejection (:func:`read_eval_set`), for the caller to route to ``<eval_topic>.dlq``
like any rejected training record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import EvaluationError
from ..kafka.codecs import DecodedBatch, Rejection, decode_batch
from ..kafka.records import CodecSpec, KafkaRecord
from ..kafka.source import KafkaSource, SourceSpec
from ..spec import EvaluationSpec

log = logging.getLogger(__name__)

NOT_A_CLASS_INDEX = "evaluation records need a class-index label (or a clean-label header), not a probability row"
# Rejections log_rejections names one by one in the log; the rest are counted.
_LOGGED_REJECTIONS = 20


@dataclass(frozen=True)
class EvalSet:
    """This rank's share of the evaluation set.

    x: [n, *input_shape] float32; y: [n] int64, each record's clean-label header where present
    (synthetic noise), else its label. ``rejected``: the records of the evaluation topic left
    out because they could not be decoded or carry no class index, batch by batch as read;
    none for an npz file. The caller sends them to the dead-letter topic (``DeadLetterSink.send``
    routes each to ``<its topic>.dlq``) and counts them.
    """

    x: Tensor
    y: Tensor
    rejected: list[Rejection] = field(default_factory=list)


def read_eval_set(spec: EvaluationSpec, codec: CodecSpec, source: SourceSpec, *, rank: int = 0,
                  world_size: int = 1, read_limit_s: float = 120.0) -> EvalSet:
    """This rank's share of the evaluation set, and the records of it that were rejected.

    Raises EvaluationError only when the set itself cannot be read (the topic not read to its
    end within ``read_limit_s``, an unreadable npz file), never for a bad record.
    """
    if spec.path is not None:
        x, y = _read_npz(Path(spec.path), codec)
        keep = slice(rank, spec.max_examples, world_size)
        return EvalSet(x[keep], y[keep])
    topic_source = source.model_copy(update={"topic": spec.topic, "start": "earliest", "stop_at": "end"})
    # Partitions split over ranks as in training; the per-rank cap keeps the total near max_examples.
    limit = -(-spec.max_examples // world_size)
    xs, ys, rejected, n = [], [], [], 0
    deadline = time.monotonic() + read_limit_s
    with KafkaSource(topic_source, rank=rank, world_size=world_size) as reader:
        while n < limit:
            if time.monotonic() > deadline:
                raise EvaluationError(f"evaluation topic {spec.topic!r} not read to its end in {read_limit_s:.0f} s")
            records = reader.next_batch()
            if records is None:
                break
            batch = decode_batch(records, codec)
            x, y, unusable = _class_index_rows(records, batch)
            rejected += [*batch.rejected, *unusable]
            if len(x):
                xs.append(x)
                ys.append(y)
                n += len(x)
    if not xs:
        return EvalSet(torch.zeros((0, *codec.input_shape)), torch.zeros(0, dtype=torch.long), rejected)
    return EvalSet(torch.cat(xs)[:limit], torch.cat(ys)[:limit], rejected)


def log_rejections(rejected: Sequence[Rejection]) -> None:
    """A warning per rejected evaluation record (the first 20) naming it, and their count."""
    for r in rejected[:_LOGGED_REJECTIONS]:
        log.warning("evaluation record %s/%d@%d left out: %s", r.record.topic, r.record.partition,
                    r.record.offset, r.reason)
    if len(rejected) > _LOGGED_REJECTIONS:
        log.warning("%d evaluation records left out in all", len(rejected))


def _class_index_rows(records: Sequence[KafkaRecord], batch: DecodedBatch) -> tuple[Tensor, Tensor, list[Rejection]]:
    """x [m, ...], y [m] of the batch's rows that have a class index, and rejections of the rows
    that do not: a probability-row label that is not one-hot, without a clean-label header."""
    clean = batch.clean_labels
    if batch.targets.dim() == 1:
        return batch.inputs, torch.where(clean >= 0, clean, batch.targets), []
    # Some record carried a probability row, so index labels became one-hot rows: a one-hot row
    # is a class index whichever way it came.
    rows = batch.targets
    one_hot = ((rows == 0) | (rows == 1)).all(dim=1) & (rows.sum(dim=1) == 1)
    usable = one_hot | (clean >= 0)
    y = torch.where(clean >= 0, clean, rows.argmax(dim=1))
    if bool(usable.all()):
        return batch.inputs, y, []
    decoded = {id(r.record) for r in batch.rejected}
    kept = [r for r in records if id(r) not in decoded]  # the batch's rows, in order
    unusable = [Rejection(kept[i], NOT_A_CLASS_INDEX) for i in torch.nonzero(~usable).flatten().tolist()]
    return batch.inputs[usable], y[usable], unusable


def _read_npz(path: Path, codec: CodecSpec) -> tuple[Tensor, Tensor]:
    try:
        with np.load(path) as data:
            x, y = data["x"], data["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise EvaluationError(f"cannot read evaluation file {path} (an .npz with arrays x and y): {exc}") from exc
    if x.shape[1:] != tuple(codec.input_shape) or y.shape != (len(x),):
        raise EvaluationError(f"evaluation file {path}: x is {x.shape} and y is {y.shape}; expected "
                              f"x [N, {', '.join(map(str, codec.input_shape))}] and y [N]")
    if len(y) and (y.min() < 0 or y.max() >= codec.num_classes):
        raise EvaluationError(f"evaluation file {path}: labels outside [0, {codec.num_classes})")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


@torch.no_grad()
def score(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(correct predictions, summed cross-entropy) of ``model`` in eval mode on x [n, ...], y [n].

    The model is put back in training mode afterwards.
    """
    was_training = model.training
    model.eval()
    correct = loss = 0.0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb)
            correct += float((logits.argmax(1) == yb).sum())
            loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
    finally:
        model.train(was_training)
    return correct, loss
