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
from .distributed import GlobalBatch, all_reduce_sum, gather_rows, resolve_group
from .gate import MemorizationGate, holdout_mask
from .instance import cap_class_shares, global_instance_weights
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
    weights: [n] this rank's clean-batch instance weights in the loss (uniform when the method or
        burn-in does not reweight; 0 for held-out rows), slices of weights summing to 1 over the
        global batch.
    diagnostics: statistics of the global batch's assessed weights (of the weights in the loss
        when there are none).
    assessed_weights: [n] the instance weights the method gives these examples at the
        configured lam, whether or not they are in the loss yet (None before the minimum burn-in
        and for unweighted methods): what reports of label quality read.
    """

    loss: Tensor
    logits: Tensor | None
    weights: Tensor
    diagnostics: CICWDiagnostics
    assessed_weights: Tensor | None = None


class CICWLoss(nn.Module):
    """The loss of one step for CE, mixup, GCE, CIW, CICW, CIW-M or CICW-M (``config.method``).

    Holds the settings, the :class:`cicw.Schedule` and, with ``gate="memorization"`` (the
    default), the :class:`cicw.gate.MemorizationGate` (both part of ``state_dict()``, so a
    checkpoint of this module resumes where it was). Call :meth:`step` after each optimizer step.

    Weighted methods train like CE (no reweighting, no mixup) until the weights switch on: after
    ``burn_in_steps`` and, gated, once the model fits the examples it trains on better than a
    held-out fraction of examples (chosen by id, never trained on). Then:

    - ``ciw`` / ``cicw``: one forward; L = CE (ciw) or the class-reweighted loss (cicw);
      loss = sum_i w_i L_i with instance weights from L.
    - ``ciw_m`` / ``cicw_m``: a forward of the clean batch without gradient gives L and w;
      weighted mixup builds the mixed batch; its forward gives the loss: weighted
      class-reweighted loss of the soft mixed targets (``recompute_on_mixed``), else mean CE.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> loss_fn = CICWLoss(CICWConfig(method="cicw", gate="steps", burn_in_steps=0, anneal_steps=0),
        ...                    num_classes=3)
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
        self.schedule = Schedule(config.burn_in_steps, config.anneal_steps, config.anneal_factor,
                                 gated=config.gated)
        self.gate = (MemorizationGate(z=config.gate_z, patience=config.gate_patience, decay=config.gate_decay)
                     if config.gated else None)

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.schedule.step()

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"schedule": self.schedule.state_dict()}
        if self.gate is not None:
            state["gate"] = self.gate.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        if self.gate is not None and "gate" in state:
            self.gate.load_state_dict(state["gate"])
            if self.gate.opened_at is not None:
                self.schedule.start()

    def forward(self, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor,
                example_ids: Tensor | None = None) -> CICWOutput:
        """Compute the step's loss.

        Shape:
            inputs: [n, *] what ``model`` takes; targets: [n] class indices or [n, K] soft labels;
            example_ids: [n] int64, the same for an example whenever it comes back (required by
            ``gate="memorization"``; e.g. :func:`cicw.gate.feature_ids` of un-augmented inputs).
            ``model(inputs)`` must return logits [n, K].
        """
        cfg = self.config
        n = inputs.shape[0]
        hard = check_targets(targets, n, self.num_classes, check_values=cfg.validate_args)
        trained: Tensor | None = None
        if self.gate is not None:
            if example_ids is None:
                raise ValueError("gate='memorization' needs example_ids (an int64 id per example, e.g. "
                                 "cicw.gate.feature_ids(inputs)); or configure gate='steps'")
            if example_ids.shape != (n,):
                raise ValueError(f"example_ids must have shape ({n},), got {tuple(example_ids.shape)}")
            trained = ~holdout_mask(example_ids.to(inputs.device, torch.int64), cfg.holdout_fraction)
        labels = targets if hard else targets.argmax(1)
        group = resolve_group(self.group)
        if cfg.method == "mixup":
            return self._plain_mixup(model, inputs, targets, labels, group)
        if cfg.method == "gce":
            return self._gce(model, inputs, targets, labels, group)
        if cfg.uses_weighted_mixup and not self.schedule.in_burn_in:
            out = self._weighted_mixup(model, inputs, targets, labels, group, trained)
        else:
            out = self._reweighted(model, inputs, targets, labels, group, trained)
        if trained is not None:
            assert out.logits is not None
            self._observe_gap(out.logits, targets, trained, group)
        return out

    def _plain_mixup(self, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor, labels: Tensor,
                     group: ProcessGroup | None) -> CICWOutput:
        """The mixup baseline: only the mixed batch is forwarded."""
        cfg = self.config
        n = inputs.shape[0]
        batch = GlobalBatch.exchange(n, inputs.device, group)
        uniform = torch.full((n,), 1.0 / max(batch.total, 1), device=inputs.device)
        x_mix, y_mix = weighted_mixup(inputs, self._soft(targets), uniform, mode="simple",
                                      beta=cfg.mixup_beta, generator=self.generator, group=group)
        mixed_log_probs = F.log_softmax(model(x_mix).float(), dim=-1)
        loss = _weighted_nll(mixed_log_probs, uniform, y_mix)
        with torch.no_grad():
            mixed, _, _ = self._inner(mixed_log_probs, y_mix, "none")
        stats = _gather_stats(mixed, labels, torch.zeros_like(mixed), batch, group)
        w = self._weights(stats[0], cfg.lam, reweight=False)
        return self._diagnosed(loss, None, stats, w, batch, cfg.lam, self.schedule.in_burn_in)

    def _gce(self, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor, labels: Tensor,
             group: ProcessGroup | None) -> CICWOutput:
        """The GCE baseline, uniform weights."""
        cfg = self.config
        batch = GlobalBatch.exchange(inputs.shape[0], inputs.device, group)
        logits = model(inputs)
        per_example = _generalised_cross_entropy(logits, self._soft(targets), cfg.gce_q)
        detached = per_example.detach()
        stats = _gather_stats(detached, labels, torch.zeros_like(detached), batch, group)
        w = self._weights(stats[0], cfg.lam, reweight=False)
        loss = (per_example * w[batch.local].to(per_example.dtype)).sum()
        return self._diagnosed(loss, logits.detach(), stats, w, batch, cfg.lam, self.schedule.in_burn_in)

    def _reweighted(self, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor, labels: Tensor,
                    group: ProcessGroup | None, trained: Tensor | None) -> CICWOutput:
        """CE, CIW or CICW, and every weighted method while its weights are off: one forward."""
        cfg = self.config
        batch = GlobalBatch.exchange(inputs.shape[0], inputs.device, group)
        burn_in = self.schedule.in_burn_in
        lam = self.schedule.lam(cfg.lam)
        reweight = cfg.uses_instance_weights and not burn_in
        class_div = cfg.class_divergence if cfg.uses_class_weights and not burn_in else "none"
        # Weights and class weights come from detached log-probabilities; the loss is then
        # -sum_ik w_i v_ik log p_ik (see _weighted_nll), so autograd sees what plain CE does.
        logits = model(inputs)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        with torch.no_grad():
            inner, v, moved = self._inner(log_probs, targets, class_div)
            stats = _gather_stats(inner, labels, moved, batch, group, trained)
            w = self._weights(stats[0], lam, reweight=reweight, labels=stats[1], trained=stats[3])
            assessed = self._assessed(stats, w, cfg.lam if burn_in else lam)
        loss = _weighted_nll(log_probs, w[batch.local], v)
        return self._diagnosed(loss, logits.detach(), stats, w, batch, lam, burn_in, assessed)

    def _weighted_mixup(self, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor,
                        labels: Tensor, group: ProcessGroup | None, trained: Tensor | None) -> CICWOutput:
        """CIW-M / CICW-M with the weights on: weights from a clean forward, then weighted mixup
        of the trained-on rows (held-out rows are never mixed) and the loss on the mixed batch."""
        cfg = self.config
        batch = GlobalBatch.exchange(inputs.shape[0], inputs.device, group)
        lam = self.schedule.lam(cfg.lam)
        class_div = cfg.class_divergence if cfg.uses_class_weights else "none"
        with torch.no_grad():
            logits = model(inputs)
            clean, _, moved = self._inner(F.log_softmax(logits.float(), dim=-1), targets, class_div)
        stats = _gather_stats(clean, labels, moved, batch, group, trained)
        w_clean = self._weights(stats[0], lam, reweight=True, labels=stats[1], trained=stats[3])
        rows = slice(None) if trained is None else trained.nonzero(as_tuple=True)[0]
        x_t, y_t, w_t = inputs[rows], self._soft(targets)[rows], w_clean[batch.local][rows]
        x_mix, y_mix = weighted_mixup(
            x_t, y_t, w_t.to(torch.float32), mode=cfg.mixup_mode, beta=cfg.mixup_beta, power=cfg.m_pow,
            generator=self.generator, predictions=logits[rows] if cfg.mixup_mode == "label_smoothing" else None,
            group=group)
        mixed_log_probs = F.log_softmax(model(x_mix).float(), dim=-1)
        mixed_batch = batch if trained is None else GlobalBatch.exchange(x_t.shape[0], inputs.device, group)
        if cfg.recompute_on_mixed:
            with torch.no_grad():
                mixed, v_mixed, _ = self._inner(mixed_log_probs, y_mix, class_div)
                both = gather_rows(torch.stack([mixed, y_mix.argmax(1).to(mixed.dtype)], 1), mixed_batch, group)
                w_mixed = self._weights(both[:, 0], lam, reweight=True, labels=both[:, 1])
            loss = _weighted_nll(mixed_log_probs, w_mixed[mixed_batch.local], v_mixed)
        else:
            uniform = torch.full((x_t.shape[0],), 1.0 / max(mixed_batch.total, 1), device=inputs.device)
            loss = _weighted_nll(mixed_log_probs, uniform, y_mix)
        return self._diagnosed(loss, logits.detach(), stats, w_clean, batch, lam, False,
                               self._assessed(stats, w_clean, lam))

    def _observe_gap(self, logits: Tensor, targets: Tensor, trained: Tensor, group: ProcessGroup | None) -> None:
        """Feed the gate this step's cross entropy (before the update) of trained-on and held-out
        rows, summed over ranks so that every rank opens it at the same step."""
        assert self.gate is not None
        with torch.no_grad():
            ce = -(self._soft(targets) * F.log_softmax(logits.float(), dim=-1)).sum(-1).double()
            t, h = trained.double(), (~trained).double()
            sums = torch.stack([t.sum(), (ce * t).sum(), (ce * ce * t).sum(),
                                h.sum(), (ce * h).sum(), (ce * ce * h).sum()])
            values = all_reduce_sum(sums, group).tolist()
        self.gate.observe_sums(train=(values[0], values[1], values[2]), holdout=(values[3], values[4], values[5]),
                               step=self.schedule.steps_done)
        if self.gate.is_open:
            self.schedule.start()

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

    def _weights(self, all_losses: Tensor, lam: float, *, reweight: bool, labels: Tensor | None = None,
                 trained: Tensor | None = None) -> Tensor:
        """Instance weights of the global batch [N] (float64) from its losses [N] and given labels
        [N] (for ``class_share_cap``); rows not ``trained`` ([N] bool, the held-out ones) get
        weight 0 and the others share 1."""
        total = all_losses.shape[0]
        if trained is not None:
            rows = trained.nonzero(as_tuple=True)[0]
            w = torch.zeros(total, dtype=torch.float64, device=all_losses.device)
            if rows.numel():
                w[rows] = self._weights(all_losses[rows], lam, reweight=reweight,
                                        labels=None if labels is None else labels[rows])
            return w
        if not reweight:
            return torch.full((total,), 1.0 / max(total, 1), dtype=torch.float64, device=all_losses.device)
        cfg = self.config
        w = global_instance_weights(all_losses, divergence=cfg.instance_divergence,
                                    alpha=cfg.alpha, lam=lam, radius=cfg.radius)
        if cfg.class_share_cap is not None and labels is not None:
            w = cap_class_shares(w, labels.long(), self.num_classes, cfg.class_share_cap)
        return w

    def _assessed(self, stats: _Stats, applied: Tensor, lam: float) -> Tensor | None:
        """The instance weights [N] of every row of the global batch, held-out ones included,
        whether or not they are in the loss; None for unweighted methods and before the minimum
        burn-in (an untrained model's losses say nothing of the labels)."""
        if not self.config.uses_instance_weights or not self.schedule.assessing:
            return None
        if stats[3] is None and not self.schedule.in_burn_in:
            return applied
        with torch.no_grad():
            return self._weights(stats[0], lam, reweight=True, labels=stats[1])

    def _diagnosed(self, loss: Tensor, logits: Tensor | None, stats: _Stats, w: Tensor,
                   batch: GlobalBatch, lam: float, burn_in: bool, assessed: Tensor | None = None) -> CICWOutput:
        # The statistics describe how the weights judge the batch (assessed, when there are
        # any), so that a report shows it before the gate lets the weights into the loss.
        diagnostics = CICWDiagnostics(w if assessed is None else assessed, stats[1], stats[2],
                                      num_classes=self.num_classes, lam=lam, in_burn_in=burn_in)
        local = batch.local
        return CICWOutput(loss=loss, logits=logits, weights=w[local].to(torch.float32), diagnostics=diagnostics,
                          assessed_weights=None if assessed is None else assessed[local].to(torch.float32))


_Stats = tuple[Tensor, Tensor, Tensor, "Tensor | None"]


def _gather_stats(losses: Tensor, labels: Tensor, moved: Tensor, batch: GlobalBatch,
                  group: ProcessGroup | None, trained: Tensor | None = None) -> _Stats:
    """Per-example (detached loss, given label, label mass moved, trained-on or None) of the
    global batch, [N] each; one all-gather for them all under torch.distributed."""
    if group is None:
        return losses, labels, moved, trained
    columns = [losses, labels, moved] if trained is None else [losses, labels, moved, trained]
    stats = gather_rows(torch.stack([c.to(losses.dtype) for c in columns], 1), batch, group)
    return stats[:, 0], stats[:, 1], stats[:, 2], (stats[:, 3] > 0.5 if trained is not None else None)


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
