"""Constrained Instance and Class reWeighting (Kumar & Amid, arXiv 2111.05428) in PyTorch.

Pure tensor math, no I/O: closed-form instance weights, class-reweighted losses, weighted mixup,
the burn-in/annealing schedule, and ``CICWLoss`` that combines them for one training step.
"""

from .class_weights import CLASS_DIVERGENCES, ClassDivergence, class_reweighted_loss
from .config import CICWConfig
from .diagnostics import CICWDiagnostics
from .instance import INSTANCE_DIVERGENCES, InstanceDivergence, instance_weights
from .loss import CICWLoss, CICWOutput
from .mixup import MIXUP_MODES, MixupMode, weighted_mixup
from .schedule import Schedule

__all__ = [
    "CLASS_DIVERGENCES",
    "INSTANCE_DIVERGENCES",
    "MIXUP_MODES",
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
