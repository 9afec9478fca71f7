"""Argument checks shared by the public entry points. Private helpers assume valid input."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor


def check_choice(name: str, value: object, allowed: Collection[str]) -> None:
    """Raise ValueError naming ``name`` and listing ``allowed`` when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def check_finite_number(name: str, value: float, *, minimum: float | None = None,
                        strict: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number (>= or > ``minimum``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value!r}")


def check_finite_tensor(name: str, t: Tensor) -> None:
    """Value check (synchronises with the device): every entry finite."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must contain only finite values")


def check_targets(targets: Tensor, n: int, num_classes: int, *, check_values: bool) -> bool:
    """Validate class-index or soft-label targets against a batch of ``n`` rows and K classes.

    Returns True for class indices ([n] integer) and False for soft rows ([n, K] float).
    """
    if targets.dim() == 1:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"class-index targets must be an integer tensor, got {targets.dtype}")
        if targets.shape[0] != n:
            raise ValueError(f"targets has {targets.shape[0]} rows, log_probs has {n}")
        if check_values and n and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(f"targets must be class indices in [0, {num_classes}), "
                             f"got values in [{int(targets.min())}, {int(targets.max())}]")
        return True
    if targets.dim() == 2:
        if not targets.dtype.is_floating_point:
            raise ValueError(f"soft targets must be a floating tensor, got {targets.dtype}")
        if tuple(targets.shape) != (n, num_classes):
            raise ValueError(f"soft targets must have shape {(n, num_classes)}, got {tuple(targets.shape)}")
        if check_values and n:
            check_finite_tensor("soft targets", targets)
            if bool((targets < 0).any()):
                raise ValueError("soft targets must be non-negative")
            if bool(((targets.sum(-1) - 1).abs() > 1e-4).any()):
                raise ValueError("each soft target row must sum to 1 (tolerance 1e-4)")
        return False
    raise ValueError(f"targets must be [n] class indices or [n, K] soft labels, got shape {tuple(targets.shape)}")
