"""Global-batch collectives: the method's minibatch is the union of every rank's local batch.

Ranks may hold different numbers of examples (including zero), so gathers pad to the largest
local count and strip the padding again. Everything here is a no-op without torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = ["GlobalBatch", "all_reduce_sum", "broadcast_from_first", "gather_rows", "resolve_group"]


def resolve_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """Return the process group to use, or None when the batch is local.

    ``group=None`` means the default group when torch.distributed is initialised; a group of
    size 1 behaves as local.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group) if group is not None else dist.get_world_size()
    if world == 1:
        return None
    return group if group is not None else dist.group.WORLD


@dataclass(frozen=True)
class GlobalBatch:
    """Where this rank's rows sit inside the gathered global batch."""

    counts: tuple[int, ...]
    rank: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def local(self) -> slice:
        start = sum(self.counts[: self.rank])
        return slice(start, start + self.counts[self.rank])

    @staticmethod
    def exchange(local_count: int, device: torch.device, group: ProcessGroup | None) -> GlobalBatch:
        """All-gather the per-rank row counts (one collective); local when ``group`` is None."""
        if group is None:
            return GlobalBatch(counts=(local_count,), rank=0)
        world = dist.get_world_size(group)
        mine = torch.tensor([local_count], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(counts, mine, group=group)
        return GlobalBatch(counts=tuple(int(c.item()) for c in counts), rank=dist.get_rank(group))


def gather_rows(t: Tensor, batch: GlobalBatch, group: ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order.

    Shape: ``t`` is [n_local, *rest]; the result is [sum of n over ranks, *rest]. No gradient
    flows through the gather (callers gather detached losses and inputs only).
    """
    if group is None:
        return t
    width = max(batch.counts)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in batch.counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, batch.counts)], dim=0)


def all_reduce_sum(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum ``t`` over ranks (returns a new tensor; ``t`` is left alone)."""
    if group is None:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def broadcast_from_first(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """Make every rank hold the first rank's ``t``, so random draws agree across ranks."""
    if group is None:
        return t
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    out = t.contiguous().clone()
    dist.broadcast(out, src=src, group=group)
    return out
