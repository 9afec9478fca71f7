"""Invalid arguments to the public functions raise ValueError, and the message names the problem."""

from __future__ import annotations

import math

import pytest
import torch

import cicw

LP = torch.log_softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), -1)
IDX = torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence": "js"}, r"divergence must be one of .*'js'"),
        ({"divergence": "KL"}, r"divergence must be one of"),  # names are case-sensitive
        ({"divergence": "alpha"}, r"divergence must be one of"),  # an instance divergence
        ({"gamma": -0.1}, r"gamma must be >= 0"),
        ({"gamma": math.nan}, r"gamma must be a finite number"),
        ({"gamma": math.inf}, r"gamma must be a finite number"),
    ],
)
def test_class_loss_rejects_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cicw.class_reweighted_loss(LP, IDX, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (torch.tensor([0, -1, 2]), r"class indices in \[0, 4\)"),
        (torch.tensor([0, 4, 2]), r"class indices in \[0, 4\)"),
        (torch.tensor([0, 1]), r"targets has 2 rows, log_probs has 3"),
        (torch.tensor([0.0, 1.0, 2.0]), r"integer"),
        (torch.tensor([True, False, True]), r"integer"),
        (torch.full((3, 5), 0.2), r"shape \(3, 4\)"),
        (torch.full((2, 4), 0.25), r"shape \(3, 4\)"),
        (torch.full((3, 4), 0.3), r"sum to 1"),
        (torch.tensor([[1.5, -0.5, 0.0, 0.0]] * 3), r"non-negative"),
        (torch.tensor([[math.nan, 1.0, 0.0, 0.0]] * 3), r"finite"),
        (torch.zeros(3, 4, dtype=torch.long), r"floating"),
        (torch.zeros(3, 4, 1), r"\[n\] class indices or \[n, K\] soft labels"),
    ],
)
def test_class_loss_rejects_bad_targets(targets: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cicw.class_reweighted_loss(LP, targets)


@pytest.mark.parametrize(
    ("log_probs", "match"),
    [
        (torch.zeros(3), r"log_probs must be a floating \[n, K\] tensor"),
        (torch.zeros(3, 4, 2), r"log_probs must be a floating \[n, K\] tensor"),
        (torch.zeros(3, 4, dtype=torch.long), r"log_probs must be a floating \[n, K\] tensor"),
        (torch.full((3, 4), math.nan), r"log_probs must not contain NaN"),
    ],
)
def test_class_loss_rejects_bad_log_probs(log_probs: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cicw.class_reweighted_loss(log_probs, IDX)


@pytest.mark.parametrize(
    ("losses", "kwargs", "match"),
    [
        (torch.rand(5), {"divergence": "kl"}, r"divergence must be one of .*'kl'"),
        (torch.rand(5), {"divergence": "tv"}, r"needs radius"),
        (torch.rand(5), {"divergence": "tv", "radius": -0.1}, r"radius must be >= 0"),
        (torch.rand(5), {"divergence": "tv", "radius": math.nan}, r"radius must be a finite number"),
        (torch.rand(5), {"lam": 0.0}, r"lam must be > 0"),
        (torch.rand(5), {"lam": -1.0}, r"lam must be > 0"),
        (torch.rand(5), {"lam": math.inf}, r"lam must be a finite number"),
        (torch.rand(5), {"alpha": math.nan}, r"alpha must be a finite number"),
        (torch.rand(2, 3), {}, r"losses must be a 1-D tensor"),
        (torch.tensor(1.0), {}, r"losses must be a 1-D tensor"),
        (torch.tensor([1, 2]), {}, r"losses must be a floating tensor"),
        (torch.tensor([1.0, math.nan]), {}, r"losses must contain only finite values"),
        (torch.tensor([1.0, math.inf]), {}, r"losses must contain only finite values"),
    ],
)
def test_instance_weights_reject_bad_arguments(losses: torch.Tensor, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cicw.instance_weights(losses, **kwargs)  # type: ignore[arg-type]
