"""One optimizer step of a job: the model, its optimizer and LR schedule, the CICW loss, and the
step that updates them. The train loop and the benchmarks (bench/job_throughput.py,
bench/stream_train.py) run this same step."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cicw import CICWLoss, CICWOutput
from cicw.gate import feature_ids

from ..spec import OptimizerSpec
from .augment import pad_crop_flip


def build_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter],
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """The optimizer and its step-wise LR schedule that a job spec names."""
    optimizer: torch.optim.Optimizer
    if spec.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                                    nesterov=spec.nesterov and spec.momentum > 0, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=spec.lr_milestones,
                                                           gamma=spec.lr_gamma)


@dataclass(frozen=True)
class StepResult:
    """What one step computed: the CICW output (loss, weights, logits, diagnostics) and the
    targets on the device."""

    out: CICWOutput
    targets: Tensor

    @property
    def weights_active(self) -> bool:
        """Whether the weights judge the labels yet (past the minimum burn-in; in the loss or not)."""
        return self.out.assessed_weights is not None

    @property
    def judged_weights(self) -> Tensor:
        """[n] the weights reports of label quality read: assessed ones when there are any."""
        return self.out.weights if self.out.assessed_weights is None else self.out.assessed_weights


@dataclass
class Learner:
    """Everything one optimizer step updates.

    ``model`` is DDP-wrapped when ``world_size`` > 1 (DDP averages gradients over ranks);
    ``augment`` draws the pad-crop-flip augmentation of image batches (None: no augmentation).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: CICWLoss
    device: torch.device
    world_size: int = 1
    augment: torch.Generator | None = None

    @property
    def raw_model(self) -> nn.Module:
        """The model without its DDP wrapper (for state dicts, and evaluation without collectives)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """Train on this rank's share of a global batch: x [n, *input_shape], y [n] class indices
        or [n, K] probabilities (n may be 0 on some ranks, never on all)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        # Identified by content before augmentation, so a replayed record keeps its id (and its
        # side of the memorization gate's holdout).
        ids = feature_ids(x) if self.loss_fn.gate is not None else None
        if self.augment is not None:
            x = pad_crop_flip(x, generator=self.augment)
        out = self.loss_fn(self.model, x, y, example_ids=ids)
        # DDP averages gradients over ranks; each rank's loss is its share of the global
        # weighted loss, so scaling by the world size yields the global loss's gradient.
        (out.loss * self.world_size if self.world_size > 1 else out.loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.loss_fn.step()
        return StepResult(out, y)

    def state_dicts(self) -> dict[str, Any]:
        """model, optimizer, scheduler and loss state dicts, as a checkpoint holds them."""
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict()}
