"""What a checkpoint holds, as one typed value: :class:`TrainState`.

The model, optimizer, LR schedule and CICW schedule as their ``state_dict``s, the job's
counters, every rank's random generator states and the :class:`CheckpointMeta` (identity,
offsets). As a payload it is made of tensors, numbers, strings, lists and dicts only, so it
loads with ``torch.load(weights_only=True)``: a writable checkpoint store must never mean code
execution on every worker. Its invariants are checked when it is read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from ..errors import CheckpointError
from .checkpoint_meta import CHECKPOINT_FORMAT, CheckpointMeta
from .label_quality import LabelQuality
from .metrics import NoiseTotals
from .suspects import SuspectTotals

# The generators each rank saves (workers.train.randomness.WorkerRandomness.state()); "global_cuda"
# is there too when the rank trained on a GPU.
RNG_STREAMS = ("mixup", "augment", "global")


@dataclass
class Counters:
    """The job's totals across runs of the same job id (the same on every rank)."""

    step: int = 0
    examples: int = 0
    rejected: int = 0
    noise: NoiseTotals = field(default_factory=NoiseTotals)
    labels: LabelQuality = field(default_factory=LabelQuality)
    suspects: SuspectTotals = field(default_factory=SuspectTotals)

    def as_payload(self) -> dict[str, Any]:
        """Plain ints in the checkpoint's flat layout, and the label quality per source and class."""
        return {"step": self.step, "examples": self.examples, "rejected": self.rejected,
                "noise_down": self.noise.down, "noise_corrupted": self.noise.corrupted, "noise_hit": self.noise.hit,
                "label_quality": self.labels.as_payload(), "suspects": self.suspects.as_payload()}

    @classmethod
    def from_payload(cls, payload: Any) -> Counters:
        """Read :meth:`as_payload`'s layout back; raises CheckpointError on missing, negative or
        inconsistent counts. A checkpoint written before label quality was kept (no
        ``label_quality``) or suspects restores empty totals."""
        names = ("step", "examples", "rejected", "noise_down", "noise_corrupted", "noise_hit")
        if not isinstance(payload, dict) or set(payload) - {"label_quality", "suspects"} != set(names):
            got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"checkpoint counters must be {list(names)}, got {got}")
        bad = [k for k in names if type(payload[k]) is not int or payload[k] < 0]
        if bad:
            raise CheckpointError(f"checkpoint counters {bad} are not non-negative integers")
        noise = NoiseTotals(payload["noise_down"], payload["noise_corrupted"], payload["noise_hit"])
        if noise.hit > min(noise.down, noise.corrupted):
            raise CheckpointError(f"checkpoint counters are inconsistent: noise_hit {noise.hit} exceeds "
                                  f"noise_down {noise.down} or noise_corrupted {noise.corrupted}")
        labels = (LabelQuality.from_payload(payload["label_quality"]) if "label_quality" in payload
                  else LabelQuality())
        suspects = SuspectTotals.from_payload(payload["suspects"]) if "suspects" in payload else SuspectTotals()
        return cls(payload["step"], payload["examples"], payload["rejected"], noise, labels, suspects)


@dataclass
class TrainState:
    """One checkpoint's contents (see the module docstring). ``rng`` has one entry per rank of
    the run that wrote it; a run with another world size starts streams of its own."""

    meta: CheckpointMeta
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loss: dict[str, Any]
    counters: Counters
    rng: list[dict[str, Tensor]]

    @property
    def offsets(self) -> dict[int, int]:
        """Partition -> the next offset to read."""
        return dict(self.meta.offsets)

    def rng_for(self, rank: int, world_size: int) -> dict[str, Tensor] | None:
        """This rank's saved generator states, or None when the checkpoint's run had another
        number of ranks (rank r of W is not rank r of W')."""
        return self.rng[rank] if len(self.rng) == world_size else None

    def as_payload(self) -> dict[str, Any]:
        """What torch.save writes: plain containers, tensors and numbers only."""
        return {"version": CHECKPOINT_FORMAT, "meta": self.meta.model_dump(mode="json"), "model": self.model,
                "optimizer": self.optimizer, "scheduler": self.scheduler, "loss": self.loss,
                "counters": self.counters.as_payload(), "rng": self.rng}

    @classmethod
    def from_payload(cls, payload: Any) -> TrainState:
        """Validate what torch.load(weights_only=True) returned; raises CheckpointError naming the
        first broken invariant (format version, meta, counters against the meta, generator states)."""
        if not isinstance(payload, dict):
            raise CheckpointError(f"a checkpoint holds a dict, not {type(payload).__name__}")
        if payload.get("version") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format version {payload.get('version')!r} is not {CHECKPOINT_FORMAT}"
                                  " (written by another version of cicw-stream; start a new job_id)")
        missing = sorted({f.name for f in fields(cls)} - set(payload))
        if missing:
            raise CheckpointError(f"checkpoint lacks {missing}")
        try:
            meta = CheckpointMeta.model_validate(payload["meta"])
        except ValidationError as exc:
            raise CheckpointError(f"checkpoint meta is not valid: {exc}") from exc
        counters = Counters.from_payload(payload["counters"])
        if (counters.step, counters.examples) != (meta.step, meta.examples):
            raise CheckpointError(f"checkpoint counters (step {counters.step}, examples {counters.examples}) "
                                  f"disagree with its meta (step {meta.step}, examples {meta.examples})")
        for name in ("model", "optimizer", "scheduler", "loss"):
            if not isinstance(payload[name], dict):
                raise CheckpointError(f"checkpoint {name} is {type(payload[name]).__name__}, not a state dict")
        return cls(meta=meta, model=payload["model"], optimizer=payload["optimizer"],
                   scheduler=payload["scheduler"], loss=payload["loss"], counters=counters,
                   rng=_checked_rng(payload["rng"]))


def _checked_rng(rng: Any) -> list[dict[str, Tensor]]:
    if not isinstance(rng, list):
        raise CheckpointError(f"checkpoint rng is {type(rng).__name__}, not a list (one entry per rank)")
    for rank, states in enumerate(rng):
        if not isinstance(states, dict):
            raise CheckpointError(f"checkpoint rng of rank {rank} is {type(states).__name__}, not a dict")
        if not set(RNG_STREAMS) <= set(states):
            raise CheckpointError(f"checkpoint rng of rank {rank} lacks {sorted(set(RNG_STREAMS) - set(states))}")
        bad = [k for k, v in states.items() if not (isinstance(v, Tensor) and v.dtype == torch.uint8)]
        if bad:
            raise CheckpointError(f"checkpoint rng of rank {rank}: {bad} are not generator states (uint8 tensors)")
    return rng

