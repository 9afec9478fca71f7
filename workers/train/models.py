"""Model registry: the architectures a job spec can name, plus ``package.module:factory`` from
packages the operator allow-listed. torch only."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError


def mlp(in_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (512, 512),
        dropout: float = 0.0) -> nn.Module:
    """Fully connected ReLU network over the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(in_shape).prod())
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_shape: Sequence[int], num_classes: int, *, width: int = 32) -> nn.Module:
    """Two conv-BN-ReLU-pool blocks and a linear head; for [C, H, W] inputs of any size."""
    channels = in_shape[0] if len(in_shape) == 3 else 1
    return nn.Sequential(
        nn.Unflatten(1, (channels, *in_shape[-2:])) if len(in_shape) == 2 else nn.Identity(),
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


class _PreActBlock(nn.Module):
    """BN-ReLU-conv twice with an identity (or 1x1 conv) shortcut (He et al. 2016, 'identity mappings')."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 images (CIFAR stem: 3x3 conv, no max-pool)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.stem(x))
        out = torch.relu(self.bn(out))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def preact_resnet18(in_shape: Sequence[int], num_classes: int) -> nn.Module:
    return PreActResNet18(in_channels=in_shape[0], num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "preact_resnet18": preact_resnet18,
}


# Operators list the installed packages whose factories job specs may name; a job spec alone must
# never be able to import arbitrary code on the workers (the REST service accepts specs).
MODEL_PACKAGES_ENV = "CICW_MODEL_PACKAGES"


def allowed_model_packages() -> tuple[str, ...]:
    """Top-level package names from $CICW_MODEL_PACKAGES (comma-separated); empty by default."""
    return tuple(p.strip() for p in os.environ.get(MODEL_PACKAGES_ENV, "").split(",") if p.strip())


def resolve_model(name: str, allowed_packages: Sequence[str] = ()) -> Callable[..., nn.Module]:
    """The factory a job spec names: a registered model, or ``package.module:factory`` whose
    top-level package is in ``allowed_packages``. Raises ModelError saying what is allowed.

    A factory is called as ``factory(in_shape, num_classes, **options)`` and returns a module
    mapping [B, *in_shape] to logits [B, num_classes].
    """
    if name in MODELS:
        return MODELS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"unknown model {name!r}; registered models: {sorted(MODELS)}, "
                         f"or 'package.module:factory' from a package in ${MODEL_PACKAGES_ENV}")
    package = module_name.split(".")[0]
    if package not in allowed_packages:
        raise ModelError(f"model {name!r}: package {package!r} is not allow-listed "
                         f"(${MODEL_PACKAGES_ENV}={','.join(allowed_packages)!r})")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ModelError(f"model {name!r}: cannot import {module_name!r}: {exc}") from exc
    except AttributeError as exc:
        raise ModelError(f"model {name!r}: {module_name!r} has no attribute {attr!r}") from exc
    if not callable(factory):
        raise ModelError(f"model {name!r}: {attr!r} is not callable")
    return factory


def build_model(name: str, *, in_shape: Sequence[int], num_classes: int,
                allowed_packages: Sequence[str] = (), **kwargs: object) -> nn.Module:
    """Instantiate a model (see :func:`resolve_model`). Raises ModelError naming what is wrong."""
    factory = resolve_model(name, allowed_packages)
    try:
        model = factory(tuple(in_shape), num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # unknown, missing or invalid options
        raise ModelError(f"model {name!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
