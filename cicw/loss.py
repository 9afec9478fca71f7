"""CICWLoss: one training step's loss for any configured method, with its diagnostics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .class_weights import inner_losses
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

    def __init__(self, config: CICWConfig, num_classes: int, *, group: ProcessGroup | None = None,
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
        labels = targets if hard else targets.argmax(1)
        group = resolve_group(self.group)
        batch = GlobalBatch.exchange(n, inputs.device, group)
        burn_in = self.schedule.in_burn_in
        lam = self.schedule.lam(cfg.lam)
        reweight = cfg.uses_instance_weights and not burn_in
        class_div = cfg.class_divergence if cfg.uses_class_weights and not burn_in else "none"

        # Weights and class weights come from detached log-probabilities; the loss is then
        # -sum_ik w_i v_ik log p_ik (see _weighted_nll), so autograd sees what plain CE does.
        if cfg.method == "mixup" or (cfg.uses_weighted_mixup and burn_in):
            # Plain mixup: only the mixed batch is forwarded.
            uniform = torch.full((n,), 1.0 / max(batch.total, 1), device=inputs.device)
            x_mix, y_mix = weighted_mixup(inputs, self._soft(targets), uniform, mode="simple",
                                          beta=cfg.mixup_beta, generator=self.generator, group=group)
            mixed_log_probs = F.log_softmax(model(x_mix).float(), dim=-1)
            loss = _weighted_nll(mixed_log_probs, uniform, y_mix)
            with torch.no_grad():
                mixed, _, _ = self._inner(mixed_log_probs, y_mix, "none")
            stats = _gather_stats(mixed, labels, torch.zeros_like(mixed), batch, group)
            w = self._weights(stats[0], lam, reweight=False)
            return self._diagnosed(loss, None, stats, w, batch, lam, burn_in)

        if cfg.uses_weighted_mixup:
            with torch.no_grad():
                logits = model(inputs)
                clean, _, moved = self._inner(F.log_softmax(logits.float(), dim=-1), targets, class_div)
            stats = _gather_stats(clean, labels, moved, batch, group)
            w_clean = self._weights(stats[0], lam, reweight=True)
            x_mix, y_mix = weighted_mixup(
                inputs, self._soft(targets), w_clean[batch.local].to(torch.float32), mode=cfg.mixup_mode,
                beta=cfg.mixup_beta, power=cfg.m_pow, generator=self.generator,
                predictions=logits if cfg.mixup_mode == "label_smoothing" else None, group=group)
            mixed_log_probs = F.log_softmax(model(x_mix).float(), dim=-1)
            if cfg.recompute_on_mixed:
                with torch.no_grad():
                    mixed, v_mixed, _ = self._inner(mixed_log_probs, y_mix, class_div)
                    w_mixed = self._weights(gather_rows(mixed, batch, group), lam, reweight=True)
                loss = _weighted_nll(mixed_log_probs, w_mixed[batch.local], v_mixed)
            else:
                uniform = torch.full((n,), 1.0 / max(batch.total, 1), device=inputs.device)
                loss = _weighted_nll(mixed_log_probs, uniform, y_mix)
            return self._diagnosed(loss, logits.detach(), stats, w_clean, batch, lam, burn_in)

        logits = model(inputs)
        if cfg.method == "gce":
            per_example = _generalised_cross_entropy(logits, self._soft(targets), cfg.gce_q)
            detached = per_example.detach()
            stats = _gather_stats(detached, labels, torch.zeros_like(detached), batch, group)
            w = self._weights(stats[0], lam, reweight=False)
            loss = (per_example * w[batch.local].to(per_example.dtype)).sum()
            return self._diagnosed(loss, logits.detach(), stats, w, batch, lam, burn_in)

        log_probs = F.log_softmax(logits.float(), dim=-1)
        with torch.no_grad():
            inner, v, moved = self._inner(log_probs, targets, class_div)
            stats = _gather_stats(inner, labels, moved, batch, group)
            w = self._weights(stats[0], lam, reweight=reweight)
        loss = _weighted_nll(log_probs, w[batch.local], v)
        return self._diagnosed(loss, logits.detach(), stats, w, batch, lam, burn_in)

    def _soft(self, targets: Tensor) -> Tensor:
        """Targets as [n, K] float32 rows (one-hot for class indices)."""
        if targets.dim() == 1:
            return F.one_hot(targets.long(), self.num_classes).to(torch.float32)
        return targets.to(torch.float32)

    def _inner(self, log_probs: Tensor, targets: Tensor, divergence: str) -> tuple[Tensor, Tensor, Tensor]:
        """Detached inner losses [n], class weights [n, K] and label mass moved [n]."""
        inner, v, moved = inner_losses(log_probs.detach(), targets, hard=targets.dim() == 1,
                                       divergence=divergence, gamma=self.config.gamma,
                                       need_weights=True)
        assert v is not None
        return inner, v, moved

    def _weights(self, all_losses: Tensor, lam: float, *, reweight: bool) -> Tensor:
        """Instance weights of the global batch [N] (float64)."""
        if not reweight:
            total = all_losses.shape[0]
            return torch.full((total,), 1.0 / max(total, 1), dtype=torch.float64,
                              device=all_losses.device)
        cfg = self.config
        return global_instance_weights(all_losses, divergence=cfg.instance_divergence,
                                       alpha=cfg.alpha, lam=lam, radius=cfg.radius)

    def _diagnosed(self, loss: Tensor, logits: Tensor | None, stats: tuple[Tensor, Tensor, Tensor], w: Tensor,
                   batch: GlobalBatch, lam: float, burn_in: bool) -> CICWOutput:
        diagnostics = CICWDiagnostics(w, stats[1], stats[2], num_classes=self.num_classes,
                                      lam=lam, in_burn_in=burn_in)
        return CICWOutput(loss=loss, logits=logits, weights=w[batch.local].to(torch.float32),
                          diagnostics=diagnostics)


def _gather_stats(losses: Tensor, labels: Tensor, moved: Tensor, batch: GlobalBatch,
                  group: ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example (detached loss, given label, label mass moved) of the global batch, [N] each;
    one all-gather for the three under torch.distributed, nothing to do without it."""
    if group is None:
        return losses, labels, moved
    stats = gather_rows(torch.stack([losses, labels.to(losses.dtype), moved.to(losses.dtype)], 1), batch, group)
    return stats[:, 0], stats[:, 1], stats[:, 2]


def _weighted_nll(log_probs: Tensor, weights: Tensor, class_weights: Tensor) -> Tensor:
    """-sum_i w_i sum_k v_ik log p_ik with w and v constants: the weighted inner loss, whose
    gradient is the Danskin gradient sum_i w_i grad L_i. [n, K], [n], [n, K] -> scalar."""
    with torch.no_grad():
        coeff = class_weights.to(log_probs.dtype) * weights.to(log_probs.dtype).unsqueeze(1)
    # log_softmax of finite logits is finite, so no 0 * -inf can arise here.
    return -(coeff * log_probs).sum()


def _generalised_cross_entropy(logits: Tensor, y_soft: Tensor, q: float) -> Tensor:
    """GCE (Zhang & Sabuncu 2018), sum_k y_k (1 - p_k^q) / q per example. [n, K] -> [n]."""
    probs = F.softmax(logits.float(), dim=-1)
    return (y_soft * (1.0 - probs.clamp_min(1e-12) ** q)).sum(-1) / q
