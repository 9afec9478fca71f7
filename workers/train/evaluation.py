"""A clean evaluation set scored every N steps while the job streams: read once at start, from a
topic (through the job's own codec, so preprocessing matches training exactly) or an npz file.
Each rank holds and scores its share; the loop sums the counts over ranks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..kafka.codecs import decode_batch
from ..kafka.records import CodecSpec
from ..kafka.source import KafkaSource, SourceSpec
from ..spec import EvaluationSpec
from ..errors import EvaluationError


def load_eval_set(spec: EvaluationSpec, codec: CodecSpec, source: SourceSpec, *, rank: int = 0,
                  world_size: int = 1, read_limit_s: float = 120.0) -> tuple[Tensor, Tensor]:
    """This rank's share of the evaluation set: x [n, *input_shape] float32, y [n] int64.

    Labels are the records' clean-label header where present (synthetic noise), else their label.
    """
    if spec.path is not None:
        x, y = _read_npz(Path(spec.path), codec)
        keep = slice(rank, spec.max_examples, world_size)
        return x[keep], y[keep]
    topic_source = source.model_copy(update={"topic": spec.topic, "start": "earliest", "stop_at": "end"})
    # Partitions split over ranks as in training; the per-rank cap keeps the total near max_examples.
    limit = -(-spec.max_examples // world_size)
    xs, ys, n = [], [], 0
    deadline = time.monotonic() + read_limit_s
    with KafkaSource(topic_source, rank=rank, world_size=world_size) as reader:
        while n < limit:
            if time.monotonic() > deadline:
                raise EvaluationError(f"evaluation topic {spec.topic!r} not read to its end in {read_limit_s:.0f} s")
            records = reader.next_batch()
            if records is None:
                break
            batch = decode_batch(records, codec)
            if len(batch) == 0:
                continue
            if batch.targets.dim() != 1:
                raise EvaluationError("evaluation records need class-index labels, not probability rows")
            clean = batch.clean_labels
            xs.append(batch.inputs)
            ys.append(torch.where(clean >= 0, clean, batch.targets))
            n += len(batch)
    if not xs:
        return torch.zeros((0, *codec.input_shape)), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


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
