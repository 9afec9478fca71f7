"""WorkerRandomness: seeded per (seed, rank, step); a restored state continues the same draws."""

from __future__ import annotations

import torch

from workers.train.randomness import WorkerRandomness, derived_seed

CPU = torch.device("cpu")


def _draws(r: WorkerRandomness) -> list[torch.Tensor]:
    return [torch.rand(3, generator=r.mixup), torch.rand(3, generator=r.augment), torch.rand(3)]


def test_restored_state_continues_every_stream() -> None:
    r = WorkerRandomness.seeded(5, rank=1, device=CPU)
    _draws(r)
    saved = r.state()
    expected = _draws(r)
    other = WorkerRandomness.seeded(99, rank=0, device=CPU)
    other.restore(saved)
    assert all(torch.equal(a, b) for a, b in zip(_draws(other), expected, strict=True))


def test_streams_differ_by_rank_purpose_and_resume_step() -> None:
    first = _draws(WorkerRandomness.seeded(5, rank=0, device=CPU))
    assert not torch.equal(first[0], first[1])  # mixup and augment are separate streams
    for other in (WorkerRandomness.seeded(5, rank=1, device=CPU),
                  WorkerRandomness.seeded(5, rank=0, device=CPU, step=9)):
        assert not any(torch.equal(a, b) for a, b in zip(first, _draws(other), strict=True))
    assert derived_seed(0, 1) != derived_seed(1, 0) and 0 <= derived_seed(2**40, 3) < 2**63
