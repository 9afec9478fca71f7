"""The few collectives the train loop needs, with every tensor on the training device.

With ``use_gpu: true`` Ray Train's process group is NCCL, which cannot reduce CPU tensors, so
nothing here builds a tensor anywhere but on :attr:`Collectives.device` (gloo, the CPU backend,
takes tensors on the CPU, which is then the training device). The process-group module is
injectable so a test can check the device of every tensor handed to it.

BatchNorm under DDP: by default DDP broadcasts rank 0's buffers to every rank before each
forward. When rank 0's partitions are empty (fewer partitions than workers, or a quiet one), its
batches have no rows, so its running statistics never move, and the broadcast overwrites every
other rank's with them: the checkpoint's (rank 0's) statistics stay those of initialisation. So
the loop wraps the model with :data:`DDP_OPTIONS` (no buffer sync before each forward: each rank's statistics
follow its own rows) and :meth:`Collectives.average_norm_buffers` merges them, weighted by the
rows each rank saw, before they are used (evaluation) or saved (checkpoint). Running statistics
do not enter the training loss (BatchNorm normalises with batch statistics in training mode), so
when they are merged does not change training. SyncBatchNorm would couple every forward of every
layer to a collective, and does not run on the CPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def _ddp_options() -> dict[str, Any]:
    """No buffer sync before each forward: ``forward_sync_buffers=False`` where torch has it (2.13+,
    which deprecates ``broadcast_buffers``; buffers are still synced once at construction, and
    every rank starts from the same initial or restored ones anyway), else ``broadcast_buffers=False``."""
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# Passed to DDP (ray.train.torch.prepare_model's parallel_strategy_kwargs); see the module docstring.
DDP_OPTIONS: dict[str, Any] = _ddp_options()
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Collectives:
    """Operations over every rank of the job (this rank's view alone when not distributed).

    ``backend`` is ``torch.distributed`` (or a stand-in with its ``all_reduce``,
    ``all_gather_object`` and ``ReduceOp``); every tensor handed to it is on ``device``.
    """

    device: torch.device
    distributed: bool
    world_size: int = 1
    backend: Any = field(default=dist, repr=False)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sum of every rank's ``values`` (one all-reduce of a float64 vector)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.backend.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        """The largest of every rank's ``value``."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.backend.all_reduce(t, op=self.backend.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self.backend.all_gather_object(out, obj)
        return out

    def average_norm_buffers(self, model: nn.Module, rows: float) -> None:
        """Give every rank the same BatchNorm running statistics: each rank's, weighted by the
        ``rows`` it forwarded in training since the last call (a rank with none, e.g. an empty
        partition, does not count). Unchanged where no rank saw a row. One all-reduce of the
        statistics' size; call on every rank at the same step."""
        buffers = [b for m in model.modules() if isinstance(m, _NORM_LAYERS) and m.track_running_stats
                   for b in (m.running_mean, m.running_var) if b is not None]
        if not self.distributed or not buffers:
            return
        one = torch.ones(1, dtype=torch.float64, device=self.device)
        flat = torch.cat([b.detach().reshape(-1).to(device=self.device, dtype=torch.float64) for b in buffers]
                         + [one]) * rows
        self.backend.all_reduce(flat)
        total = float(flat[-1].item())
        if total == 0:
            return
        merged = flat[:-1] / total
        at = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(merged[at:at + b.numel()].view_as(b))
                at += b.numel()
