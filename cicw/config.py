"""CICWConfig: every setting of the method, validated once (the job spec embeds it unchanged)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["ce", "mixup", "gce", "ciw", "cicw", "ciw_m", "cicw_m"]
MixupMode = Literal["sample_weight", "sample", "weight", "simple", "label_smoothing"]

# Bin edges of the diagnostics' histogram of n * w (1 = the uniform weight): it reads the same
# whatever the batch size. Bins are [edge_i, edge_i+1). Here, not in diagnostics.py, so readers
# of reports (the service's metrics) have them without importing torch.
WEIGHT_HISTOGRAM_EDGES = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, float("inf"))


class CICWConfig(BaseModel):
    """How a batch's loss is formed.

    ``method``: ``ce`` cross entropy; ``mixup`` plain mixup; ``gce`` generalised cross entropy
    (Zhang & Sabuncu 2018, a baseline); ``ciw`` instance weights on CE; ``cicw`` instance weights
    on the class-reweighted loss; ``ciw_m``/``cicw_m`` the same plus weighted mixup.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field("cicw_m", description="Loss method.")
    instance_divergence: Literal["alpha", "tv"] = Field(
        "alpha", description="Divergence bounding the instance weights' distance from uniform.")
    alpha: float = Field(1.0, allow_inf_nan=False,
                         description="Amari alpha (1 = KL, 0 = reverse KL, 2 = chi-square).")
    lam: float = Field(1.0, gt=0, allow_inf_nan=False,
                       description="Temperature of the instance weights after annealing; "
                                   "smaller = more aggressive down-weighting.")
    radius: float | None = Field(None, ge=0, le=1,
                                 description="TV budget for instance_divergence='tv'.")
    # 1 (every given label keeps its share of the batch's weight) rather than no cap: a weak
    # model's preferred class has the lowest losses, and free weights pile onto it until
    # training collapses onto that class (at 80% noise on Fashion-MNIST with the weights on
    # from step 42: 34% with no cap, 62% with 2, 65% with 1.5, 74% with 1; BENCHMARKS.md).
    class_share_cap: float | None = Field(
        1.0, ge=1, allow_inf_nan=False,
        description="Each given label's total instance weight is at most this many times its share of the "
                    "batch: 1 = weights move only within a class; None: no limit.")
    class_divergence: Literal["none", "kl", "tv", "l1", "l2"] = Field(
        "kl", description="Class reweighting divergence (cicw and cicw_m).")
    gamma: float = Field(0.01, ge=0, allow_inf_nan=False, description="Class reweighting budget.")
    # "sample" (partners drawn by weight, Beta ratios) rather than the paper's "sample_weight":
    # on Fashion-MNIST it was the only mode that matched CE on clean labels while keeping the
    # gains under noise (BENCHMARKS.md, bench/noisy_accuracy.py).
    mixup_mode: MixupMode = Field("sample", description="Partner/ratio rule for *_m methods.")
    mixup_beta: float = Field(2.0, gt=0, allow_inf_nan=False, description="Beta(a, a) parameter.")
    m_pow: float = Field(1.0, gt=0, allow_inf_nan=False,
                         description="Mixup uses weights w**m_pow, renormalised.")
    recompute_on_mixed: bool = Field(
        True, description="Weighted class-reweighted loss on the mixed batch (CICW-M); "
                          "False: plain mean CE on it.")
    gce_q: float = Field(0.7, gt=0, le=1, description="GCE exponent q.")
    # "memorization" rather than a step count alone: in one pass over a stream the weights and
    # mixup only cost accuracy (and can collapse a weak model onto one class at extreme noise);
    # they pay once the model starts fitting labels it has seen (BENCHMARKS.md, cicw/gate.py).
    gate: Literal["memorization", "steps"] = Field(
        "memorization", description="When weighting and mixup switch on: 'memorization' when the "
        "loss of trained-on examples falls significantly below that of a held-out fraction "
        "(needs example ids), after at least burn_in_steps; 'steps' after burn_in_steps.")
    holdout_fraction: float = Field(
        0.0625, gt=0, lt=0.5, allow_inf_nan=False,
        description="Fraction of examples (by id) never trained on, for the memorization gate.")
    gate_z: float = Field(4.0, gt=0, allow_inf_nan=False,
                          description="Standard errors the loss gap must reach to open the gate.")
    gate_patience: int = Field(10, ge=1, description="Consecutive steps the gap must stay significant.")
    gate_decay: float = Field(0.02, gt=0, lt=1, allow_inf_nan=False,
                              description="Per-step decay of the gate's running loss means.")
    burn_in_steps: int = Field(4000, ge=0, description="Steps of plain training first (with the "
                                                       "memorization gate: at least these).")
    anneal_steps: int = Field(3000, ge=0, description="Steps of lam annealing after burn-in.")
    anneal_factor: float = Field(10.0, ge=1, allow_inf_nan=False,
                                 description="lam starts at anneal_factor * lam.")
    validate_args: bool = Field(True, description="Check tensor values each step (syncs the device).")

    @model_validator(mode="after")
    def _tv_needs_radius(self) -> CICWConfig:
        if self.instance_divergence == "tv" and self.radius is None:
            raise ValueError("radius is required when instance_divergence is 'tv'")
        return self

    @property
    def gated(self) -> bool:
        """Whether the memorization gate decides when weights switch on (a holdout is kept)."""
        return self.gate == "memorization" and self.uses_instance_weights

    @property
    def uses_instance_weights(self) -> bool:
        return self.method in ("ciw", "cicw", "ciw_m", "cicw_m")

    @property
    def uses_class_weights(self) -> bool:
        return self.method in ("cicw", "cicw_m") and self.class_divergence != "none"

    @property
    def uses_weighted_mixup(self) -> bool:
        return self.method in ("ciw_m", "cicw_m")
