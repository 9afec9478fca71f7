"""Constrained Instance and Class reWeighting (Kumar & Amid, arXiv 2111.05428) in PyTorch.

Pure tensor math, no I/O: closed-form instance weights, class-reweighted losses, weighted mixup,
the burn-in/annealing schedule, and ``CICWLoss`` that combines them for one training step.

The names below load their module (and torch) on first use, so ``cicw.config`` alone, the
settings a job spec embeds, imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .class_weights import CLASS_DIVERGENCES, ClassDivergence, class_reweighted_loss
    from .config import WEIGHT_HISTOGRAM_EDGES, CICWConfig
    from .diagnostics import CICWDiagnostics
    from .instance import INSTANCE_DIVERGENCES, InstanceDivergence, instance_weights
    from .loss import CICWLoss, CICWOutput
    from .mixup import MIXUP_MODES, MixupMode, weighted_mixup
    from .schedule import Schedule

_HOME = {
    "CLASS_DIVERGENCES": "class_weights", "ClassDivergence": "class_weights", "class_reweighted_loss": "class_weights",
    "CICWConfig": "config", "WEIGHT_HISTOGRAM_EDGES": "config",
    "CICWDiagnostics": "diagnostics",
    "INSTANCE_DIVERGENCES": "instance", "InstanceDivergence": "instance", "instance_weights": "instance",
    "CICWLoss": "loss", "CICWOutput": "loss",
    "MIXUP_MODES": "mixup", "MixupMode": "mixup", "weighted_mixup": "mixup",
    "Schedule": "schedule",
}

__all__ = [
    "CLASS_DIVERGENCES",
    "INSTANCE_DIVERGENCES",
    "MIXUP_MODES",
    "WEIGHT_HISTOGRAM_EDGES",
    "CICWConfig",
    "CICWDiagnostics",
    "CICWLoss",
    "CICWOutput",
    "ClassDivergence",
    "InstanceDivergence",
    "MixupMode",
    "Schedule",
    "class_reweighted_loss",
    "instance_weights",
    "weighted_mixup",
]
assert sorted(__all__) == sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'cicw' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
