"""Burn-in and lambda annealing, counted in optimizer steps (a stream has no epochs)."""

from __future__ import annotations

from typing import Any

_STATE_VERSION = 2


class Schedule:
    """Where a run is in the CICW schedule.

    Steps ``[0, burn_in_steps)``: burn-in (uniform weights, no class reweighting, no mixup). With
    ``gated``, burn-in lasts until :meth:`start` is also called (by the memorisation gate) and
    ``burn_in_steps`` is only its minimum. Then lam anneals linearly from ``anneal_factor * lam``
    down to ``lam`` over ``anneal_steps`` steps, and stays there. Call :meth:`step` once per
    optimizer step.

    Example:
        >>> s = Schedule(burn_in_steps=2, anneal_steps=2, anneal_factor=10.0)
        >>> [(s.in_burn_in, s.lam(1.0)) for _ in range(5) if s.step() or True][-1]
        (False, 1.0)
    """

    def __init__(self, burn_in_steps: int = 4000, anneal_steps: int = 3000,
                 anneal_factor: float = 10.0, *, gated: bool = False) -> None:
        if burn_in_steps < 0 or anneal_steps < 0:
            raise ValueError("burn_in_steps and anneal_steps must be >= 0")
        if not anneal_factor >= 1.0:
            raise ValueError(f"anneal_factor must be >= 1, got {anneal_factor!r}")
        self.burn_in_steps = int(burn_in_steps)
        self.anneal_steps = int(anneal_steps)
        self.anneal_factor = float(anneal_factor)
        self.gated = gated
        self.steps_done = 0
        # Gated: the step at which start() was first called (None: not yet).
        self.started_at: int | None = None

    def step(self) -> None:
        """Record one optimizer step."""
        self.steps_done += 1

    def start(self) -> None:
        """End burn-in (once ``burn_in_steps`` are also done): the gate saw memorisation."""
        if self.started_at is None:
            self.started_at = self.steps_done

    @property
    def weights_start(self) -> int | None:
        """The step from which weights are on (None: not known yet, gated and not started)."""
        if not self.gated:
            return self.burn_in_steps
        return None if self.started_at is None else max(self.started_at, self.burn_in_steps)

    @property
    def in_burn_in(self) -> bool:
        start = self.weights_start
        return start is None or self.steps_done < start

    @property
    def assessing(self) -> bool:
        """Past the minimum burn-in: the weights are worth computing (for reports) even while
        the gate keeps them out of the loss."""
        return self.steps_done >= self.burn_in_steps

    def lam(self, base: float) -> float:
        """The lambda in force now for a configured (final) ``base``."""
        start = self.weights_start
        into = self.steps_done - (self.steps_done if start is None else start)
        if into >= self.anneal_steps:
            return base
        if into <= 0:
            return self.anneal_factor * base
        frac = into / self.anneal_steps
        return base * (self.anneal_factor + (1.0 - self.anneal_factor) * frac)

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "steps_done": self.steps_done,
                "burn_in_steps": self.burn_in_steps, "anneal_steps": self.anneal_steps,
                "anneal_factor": self.anneal_factor, "started_at": self.started_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count (and when the gate started the weights). The configured lengths
        stay those of this object, so a resumed job may change its schedule; a newer format
        version is refused. Version 1 (no gate) resumes with the gate still closed."""
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"unsupported Schedule state version {version!r} (expected {_STATE_VERSION})")
        self.steps_done = int(state["steps_done"])
        started = state.get("started_at")
        self.started_at = None if started is None else int(started)

    def __repr__(self) -> str:
        return (f"Schedule(burn_in_steps={self.burn_in_steps}, anneal_steps={self.anneal_steps}, "
                f"anneal_factor={self.anneal_factor}, gated={self.gated}, steps_done={self.steps_done}, "
                f"started_at={self.started_at})")
