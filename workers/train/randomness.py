"""Every random draw of a worker comes from generators seeded by the job's seed and the worker's
rank, and their states travel in checkpoints. So a job that is stopped and resumed (or restarted
after a crash) continues the draws it would have made: with the same batches it trains the same
model, bit for bit, as a job that ran through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Stream ids: one independent seed per purpose and rank.
_MODEL_INIT, _MIXUP, _AUGMENT, _GLOBAL = range(4)


def derived_seed(seed: int, *path: int) -> int:
    """A well-mixed 63-bit seed for (seed, *path): nearby seeds and ranks give unrelated streams."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_model_init(seed: int) -> None:
    """Seed torch's global generator so every rank builds the same initial weights."""
    torch.manual_seed(derived_seed(seed, _MODEL_INIT))


@dataclass
class WorkerRandomness:
    """The generators one rank draws from: mixup partners and ratios, augmentation crops and
    flips, and torch's global generator (dropout and anything else in a user's model)."""

    device: torch.device
    mixup: torch.Generator
    augment: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int, device: torch.device, *, step: int = 0) -> WorkerRandomness:
        """Fresh generators for ``rank``; ``step`` > 0 gives a resume without saved states its
        own streams rather than a replay of those from step 0."""
        def gen(stream: int) -> torch.Generator:
            return torch.Generator(device=device).manual_seed(derived_seed(seed, stream, rank, step))

        torch.manual_seed(derived_seed(seed, _GLOBAL, rank, step))
        return cls(device, gen(_MIXUP), gen(_AUGMENT))

    def state(self) -> dict[str, Any]:
        """The generators' states (CPU byte tensors), for a checkpoint."""
        out: dict[str, Any] = {"mixup": self.mixup.get_state(), "augment": self.augment.get_state(),
                               "global": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["global_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s snapshot."""
        self.mixup.set_state(state["mixup"])
        self.augment.set_state(state["augment"])
        torch.set_rng_state(state["global"])
        if self.device.type == "cuda" and "global_cuda" in state:
            torch.cuda.set_rng_state(state["global_cuda"], self.device)
