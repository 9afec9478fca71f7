"""CICWLoss: one training step's loss for any configured method, with its diagnostics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .class_weights import class_reweighted_loss
from .config import CICWConfig
from .diagnostics import CICWDiagnostics
from .distributed import GlobalBatch, gather_rows, resolve_group
from .instance import global_instance_weights
from .mixup import weighted_mixup
from .schedule import Schedule
from .validation import check_targets


@dataclass
class CICWOutput:
    """Result of :meth:`CICWLoss.forward`.

    loss: scalar to backpropagate. Under torch.distributed it is this rank's share of the global
        weighted loss (the shares sum to it over ranks): with DDP, which averages gradients,
        multiply by the world size to get the gradient of the global loss.
    logits: [n, K] clean-batch logits (detached), or None when only a mixed batch was forwarded.
    weights: [n] this rank's clean-batch instance weights (uniform when the method or burn-in
        does not reweight), slices of weights summing to 1 over the global batch.
    diagnostics: statistics of the global batch's weights.
    """

    loss: Tensor
    logits: Tensor | None
    weights: Tensor
    diagnostics: CICWDiagnostics


class CICWLoss(nn.Module):
    """The loss of one step for CE, mixup, GCE, CIW, CICW, CIW-M or CICW-M (``config.method``).

    Holds the settings and the :class:`cicw.Schedule` (part of ``state_dict()``, so a checkpoint
    of this module resumes burn-in and annealing where they were). Call :meth:`step` after each
    optimizer step.

    Methods after burn-in (in burn-in, weighted methods train like CE, or plain mixup for *_m):

    - ``ciw`` / ``cicw``: one forward; L = CE (ciw) or the class-reweighted loss (cicw);
      loss = sum_i w_i L_i with instance weights from L.
    - ``ciw_m`` / ``cicw_m``: a forward of the clean batch without gradient gives L and w;
      weighted mixup builds the mixed batch; its forward gives the loss: weighted
      class-reweighted loss of the soft mixed targets (``recompute_on_mixed``), else mean CE.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> loss_fn = CICWLoss(CICWConfig(method="cicw", burn_in_steps=0, anneal_steps=0), num_classes=3)
        >>> out = loss_fn(model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> out.loss.backward(); loss_fn.step()
    """

    def __init__(self, config: CICWConfig, num_classes: int, *, group: object | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.group = group
        self.generator = generator
        self.schedule = Schedule(config.burn_in_steps, config.anneal_steps, config.anneal_factor)

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.schedule.step()

    def get_extra_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    def forward(self, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor) -> CICWOutput:
        """Compute the step's loss.

        Shape:
            inputs: [n, *] what ``model`` takes; targets: [n] class indices or [n, K] soft labels.
            ``model(inputs)`` must return logits [n, K].
        """
        cfg = self.config
        n = inputs.shape[0]
        hard = check_targets(targets, n, self.num_classes, check_values=cfg.validate_args)
        y_soft = (F.one_hot(targets.long(), self.num_classes).to(torch.float32) if hard
                  else targets.to(torch.float32))
        labels = targets if hard else targets.argmax(1)
        group = resolve_group(self.group)
        batch = GlobalBatch.exchange(n, inputs.device, group)
        burn_in = self.schedule.in_burn_in
        lam = self.schedule.lam(cfg.lam)
        reweight = cfg.uses_instance_weights and not burn_in
        class_div = cfg.class_divergence if cfg.uses_class_weights and not burn_in else "none"

        if cfg.method == "mixup" or (cfg.uses_weighted_mixup and burn_in):
            # Plain mixup: only the mixed batch is forwarded.
            uniform = torch.full((n,), 1.0 / max(batch.total, 1), device=inputs.device)
            x_mix, y_mix = weighted_mixup(inputs, y_soft, uniform, mode="simple", beta=cfg.mixup_beta,
                                          generator=self.generator, group=group)
            per_example = _soft_cross_entropy(model(x_mix), y_mix)
            loss = (per_example * uniform).sum()
            stats = torch.stack([per_example.detach(), labels.to(per_example.dtype),
                                 torch.zeros_like(per_example)], 1)
            all_stats = gather_rows(stats, batch, group)
            w = self._weights(all_stats[:, 0], lam, reweight=False)
            return self._diagnosed(loss, None, all_stats, w, batch, lam, burn_in)

        if cfg.uses_weighted_mixup:
            with torch.no_grad():
                logits = model(inputs)
                clean, moved = self._inner_losses(logits, targets, class_div)
            stats = torch.stack([clean, labels.to(clean.dtype), moved], 1)
            all_stats = gather_rows(stats, batch, group)
            w_clean = self._weights(all_stats[:, 0], lam, reweight=True)
            x_mix, y_mix = weighted_mixup(
                inputs, y_soft, w_clean[batch.local].to(torch.float32), mode=cfg.mixup_mode,
                beta=cfg.mixup_beta, power=cfg.m_pow, generator=self.generator,
                predictions=logits if cfg.mixup_mode == "label_smoothing" else None, group=group)
            mixed_logits = model(x_mix)
            if cfg.recompute_on_mixed:
                mixed, _ = self._inner_losses(mixed_logits, y_mix, class_div)
                all_mixed = gather_rows(mixed.detach(), batch, group)
                w_mixed = self._weights(all_mixed, lam, reweight=True)[batch.local]
            else:
                mixed = _soft_cross_entropy(mixed_logits, y_mix)
                w_mixed = torch.full((n,), 1.0 / max(batch.total, 1), device=inputs.device)
            loss = (mixed * w_mixed.to(mixed.dtype)).sum()
            return self._diagnosed(loss, logits.detach(), all_stats, w_clean, batch, lam, burn_in)

        logits = model(inputs)
        if cfg.method == "gce":
            per_example = _generalised_cross_entropy(logits, y_soft, cfg.gce_q)
            moved = torch.zeros_like(per_example)
        else:
            per_example, moved = self._inner_losses(logits, targets, class_div)
        stats = torch.stack([per_example.detach(), labels.to(per_example.dtype), moved], 1)
        all_stats = gather_rows(stats, batch, group)
        w = self._weights(all_stats[:, 0], lam, reweight=reweight)
        loss = (per_example * w[batch.local].to(per_example.dtype)).sum()
        return self._diagnosed(loss, logits.detach(), all_stats, w, batch, lam, burn_in)

    def _inner_losses(self, logits: Tensor, targets: Tensor, divergence: str) -> tuple[Tensor, Tensor]:
        """Per-example (class-reweighted) losses [n] and the label mass moved [n]."""
        log_probs = F.log_softmax(logits.float(), dim=-1)
        losses, v = class_reweighted_loss(log_probs, targets, divergence=divergence,  # type: ignore[arg-type]
                                          gamma=self.config.gamma, return_weights=True,
                                          validate_args=False)
        if divergence == "none":
            return losses, torch.zeros_like(losses)
        y = (F.one_hot(targets.long(), self.num_classes).to(v.dtype) if targets.dim() == 1
             else targets.to(v.dtype))
        return losses, 0.5 * (v - y).abs().sum(1)

    def _weights(self, all_losses: Tensor, lam: float, *, reweight: bool) -> Tensor:
        """Instance weights of the global batch [N] (float64)."""
        if not reweight:
            total = all_losses.shape[0]
            return torch.full((total,), 1.0 / max(total, 1), dtype=torch.float64,
                              device=all_losses.device)
        cfg = self.config
        return global_instance_weights(all_losses, divergence=cfg.instance_divergence,
                                       alpha=cfg.alpha, lam=lam, radius=cfg.radius)

    def _diagnosed(self, loss: Tensor, logits: Tensor | None, all_stats: Tensor, w: Tensor,
                   batch: GlobalBatch, lam: float, burn_in: bool) -> CICWOutput:
        diagnostics = CICWDiagnostics(w, all_stats[:, 1], all_stats[:, 2], num_classes=self.num_classes,
                                      lam=lam, in_burn_in=burn_in)
        return CICWOutput(loss=loss, logits=logits, weights=w[batch.local].to(torch.float32),
                          diagnostics=diagnostics)


def _soft_cross_entropy(logits: Tensor, y_soft: Tensor) -> Tensor:
    """-sum_k y_k log softmax(logits)_k per example. [n, K], [n, K] -> [n]."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    y = y_soft.to(log_probs.dtype)
    return -torch.where(y > 0, y * log_probs, torch.zeros_like(log_probs)).sum(-1)


def _generalised_cross_entropy(logits: Tensor, y_soft: Tensor, q: float) -> Tensor:
    """GCE (Zhang & Sabuncu 2018), sum_k y_k (1 - p_k^q) / q per example. [n, K] -> [n]."""
    probs = F.softmax(logits.float(), dim=-1)
    return (y_soft * (1.0 - probs.clamp_min(1e-12) ** q)).sum(-1) / q
