"""Label quality per source and per given class: what the weights and the model say of each.

A record names its source (codec ``source_field``: a json key, or a header of raw and image
records; "unknown" when it names none). For each source, and for each given label, the job
counts over its life (checkpointed, in :class:`LabelQuality`):

- records trained; of those trained after burn-in (the weights are uniform before), the sum of
  N*w (mean normalised weight) and how many were down-weighted (N*w < 1/4);
- the estimated noise rate (below), and, where records carry the clean-label header, the true
  rate of wrong given labels, to check it against.

Noise estimator (needs no clean label). After burn-in, ``d`` is the fraction of a source's
records whose given label differs from the model's prediction on them before it trains on them
(the prequential prediction, the logits of the step's forward pass). With a model whose accuracy
against the true label is ``a = 1 - e``, symmetric noise at rate ``rho`` over ``K`` classes (a
wrong label is any other class alike) and model errors spread alike over the other classes:

    P(prediction == given) = (1 - rho) * a + rho * e / (K - 1)
    =>  rho = (d - e) / (1 - e * K / (K - 1))

so ``d`` alone overestimates ``rho`` by about ``e * (1 - rho * K / (K - 1))``. ``e`` is one
number for the whole job (features do not depend on the source), calibrated in this order:
(1) the model's error against the clean-label header on the records that carry one (any source,
after burn-in), (2) else 1 - the clean evaluation set's latest accuracy, (3) else 0 (then the
estimate is the disagreement rate, an upper bound biased by the model's error). The result is
clipped to [0, 1]. The down-weighted fraction is reported beside it but not used: it depends on
the batch's mix of sources and on the temperature, not only on the source's noise.

Bounded cardinality: the job keeps the ``max_sources`` sources with the most records; the rest
are folded into one row named "other" (a source folded early and seen often later comes back
with its later counts only). Between reports each rank counts its own records in a window table
(itself bounded to 4 * max_sources names); at each report every rank all-gathers the windows
(``all_gather_object``, once per report, never per step) and merges them in rank order into the
job's totals, so every rank holds the same totals and names without agreeing on a mapping of
names to slots beforehand (hashing names to slots would lose the names the metrics need).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..kafka.codecs import UNKNOWN_SOURCE
from ..report import ClassQuality, SourceQuality

OTHER_SOURCE = "other"
DOWN_WEIGHTED_BELOW = 0.25  # N*w under this is down-weighted (cicw's low-weight fraction)
WINDOW_NAMES_PER_SOURCE = 4  # a rank's window table keeps up to this many times max_sources names
# Steps a window holds uncounted at most (their tensors: about 15 numbers per example).
PENDING_STEPS = 64
# The counts kept per source or class, in this order (a checkpoint's rows).
TALLY_FIELDS = ("seen", "weighed", "weight_sum", "down", "scored", "disagree", "known", "noisy",
                "checked", "mistaken")


@dataclass
class Tally:
    """Counts for one source or one given label (see TALLY_FIELDS): ``seen`` records trained;
    ``weighed`` of them after burn-in, with ``weight_sum`` their N*w and ``down`` those with
    N*w < 1/4; ``scored`` of the weighed with a class-index label and a prediction, ``disagree``
    of those predicted another class than given; ``known`` of the weighed with a clean label,
    ``noisy`` of those given a wrong one; ``checked`` scored and known, ``mistaken`` of those
    predicted another class than the clean label (the model's error, for the calibration)."""

    seen: float = 0.0
    weighed: float = 0.0
    weight_sum: float = 0.0
    down: float = 0.0
    scored: float = 0.0
    disagree: float = 0.0
    known: float = 0.0
    noisy: float = 0.0
    checked: float = 0.0
    mistaken: float = 0.0

    def row(self) -> list[float]:
        """The counts in TALLY_FIELDS order."""
        return [getattr(self, name) for name in TALLY_FIELDS]

    def add_row(self, row: Sequence[float]) -> None:
        """Add counts given in TALLY_FIELDS order."""
        for name, value in zip(TALLY_FIELDS, row, strict=True):
            setattr(self, name, getattr(self, name) + float(value))

    def disagreement(self) -> float | None:
        """Fraction of the scored records predicted another class than given (None: none scored)."""
        return self.disagree / self.scored if self.scored else None

    def estimated_noise(self, model_error: float, num_classes: int) -> float | None:
        """The calibrated noise estimate of the module docstring, in [0, 1] (None: none scored)."""
        d = self.disagreement()
        if d is None:
            return None
        scale = 1.0 - model_error * num_classes / (num_classes - 1)
        if scale <= 0:  # a model at chance level tells nothing: the raw disagreement
            return min(max(d, 0.0), 1.0)
        return min(max((d - model_error) / scale, 0.0), 1.0)

    def quality_fields(self, model_error: float, num_classes: int) -> dict[str, Any]:
        """The fields SourceQuality and ClassQuality share."""
        return {"records": int(self.seen), "weighed": int(self.weighed),
                "mean_weight": self.weight_sum / self.weighed if self.weighed else None,
                "down_weighted_fraction": self.down / self.weighed if self.weighed else None,
                "disagreement": self.disagreement(),
                "estimated_noise": self.estimated_noise(model_error, num_classes),
                "true_noise": self.noisy / self.known if self.known else None}


def _fold(tallies: dict[str, Tally], keep: int) -> None:
    """Keep the ``keep`` names with the most records (ties: by name), fold the rest into "other"."""
    named = [n for n in tallies if n != OTHER_SOURCE]
    if len(named) <= keep:
        return
    ranked = sorted(named, key=lambda n: (-tallies[n].seen, n))
    other = tallies.setdefault(OTHER_SOURCE, Tally())
    for name in ranked[keep:]:
        other.add_row(tallies.pop(name).row())


@dataclass(frozen=True)
class _PendingStep:
    """A step a LabelWindow has not counted yet (tensors detached): ``names`` one per row, or
    None for all "unknown"; targets [n] or [n, K]; clean_labels [n]; logits [n, K] or None;
    weights [n] or None (before burn-in) with the step's global example count."""

    names: Sequence[str] | None
    targets: Tensor
    clean_labels: Tensor
    logits: Tensor | None
    weights: Tensor | None
    global_examples: int

    @property
    def kind(self) -> tuple[int, bool, bool]:
        return self.targets.dim(), self.logits is not None, self.weights is not None


@dataclass
class LabelWindow:
    """One rank's counts since the last report (what it all-gathers at the report). Steps are
    counted when the counts are read, consecutive steps of one kind in one go: a few torch ops
    per report instead of per step, which the training thread would pay between steps."""

    num_classes: int
    max_sources: int
    _sources: dict[str, Tally] = field(default_factory=dict, repr=False)
    _classes: list[Tally] = field(default_factory=list, repr=False)
    _pending: list[_PendingStep] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self._classes:
            self._classes = [Tally() for _ in range(self.num_classes)]

    @property
    def sources(self) -> dict[str, Tally]:
        """Counts per source name (at most 4 x max_sources names and "other")."""
        self._settle()
        return self._sources

    @property
    def classes(self) -> list[Tally]:
        """Counts per given class."""
        self._settle()
        return self._classes

    def observe(self, *, sources: Sequence[str], targets: Tensor, clean_labels: Tensor, logits: Tensor | None,
                weights: Tensor, global_examples: int, weights_active: bool) -> None:
        """Count one step of this rank: ``sources`` one name per row (empty: all "unknown"),
        targets [n] class indices or [n, K] probabilities, clean_labels [n] (-1: unknown),
        logits [n, K] before the update (None: not forwarded), weights [n] this rank's share of
        the global instance weights (N = ``global_examples``)."""
        n = int(targets.shape[0])
        if n == 0:
            return
        self._pending.append(_PendingStep(
            sources if len(sources) == n else None, targets.detach(), clean_labels.detach(),
            None if logits is None else logits.detach(), weights.detach() if weights_active else None,
            global_examples))
        if len(self._pending) >= PENDING_STEPS:
            self._settle()

    def _settle(self) -> None:
        for _, run in itertools.groupby(self._pending, key=lambda s: s.kind):
            self._count(list(run))
        self._pending = []

    def _count(self, steps: list[_PendingStep]) -> None:
        """Add steps of one kind, as counting them one by one would (names folded after each)."""
        first = steps[0]
        targets = torch.cat([s.targets for s in steps])
        scaled = (torch.cat([s.weights.double().cpu() * s.global_examples for s in steps if s.weights is not None])
                  if first.weights is not None else None)
        logits = torch.cat([s.logits for s in steps if s.logits is not None]) if first.logits is not None else None
        columns = self._columns(targets, torch.cat([s.clean_labels for s in steps]), logits, scaled)
        keep = WINDOW_NAMES_PER_SOURCE * self.max_sources
        names = set().union(*(s.names if s.names is not None else (UNKNOWN_SOURCE,) for s in steps))
        if len(names | self._sources.keys()) <= keep:  # no fold between these steps: count them at once
            self._add_by_name([name for s in steps for name in self._names(s)], columns)
        else:
            at = 0
            for s in steps:
                n = len(s.targets)
                self._add_by_name(self._names(s), columns[at:at + n])
                _fold(self._sources, keep)
                at += n
        if first.targets.dim() == 1:
            per_class = torch.zeros(self.num_classes, len(TALLY_FIELDS), dtype=torch.float64)
            per_class.index_add_(0, targets.cpu().long(), columns)
            for tally, row in zip(self._classes, per_class.tolist()):
                tally.add_row(row)
        _fold(self._sources, keep)

    @staticmethod
    def _names(step: _PendingStep) -> list[str]:
        return list(step.names) if step.names is not None else [UNKNOWN_SOURCE] * len(step.targets)

    def _add_by_name(self, names: list[str], columns: Tensor) -> None:
        """Add each row of ``columns`` [n, len(TALLY_FIELDS)] to the tally of its name."""
        if all(name == names[0] for name in names):  # one source: no index per name
            self._sources.setdefault(names[0], Tally()).add_row(columns.sum(0).tolist())
            return
        # Rows grouped by name with one index per source: a handful of sources per batch.
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            by_name.setdefault(name, []).append(i)
        for name, rows in by_name.items():
            idx = torch.tensor(rows, dtype=torch.long)
            self._sources.setdefault(name, Tally()).add_row(columns[idx].sum(0).tolist())

    @staticmethod
    def _columns(targets: Tensor, clean_labels: Tensor, logits: Tensor | None, nw: Tensor | None) -> Tensor:
        """[n, len(TALLY_FIELDS)] float64 counts of each row (on the CPU); ``nw`` [n] float64 N*w
        on the CPU, None before burn-in."""
        n = int(targets.shape[0])
        out = torch.zeros(n, len(TALLY_FIELDS), dtype=torch.float64)
        out[:, 0] = 1.0
        if nw is None:
            return out
        out[:, 1] = 1.0
        out[:, 2] = nw
        out[:, 3] = (nw < DOWN_WEIGHTED_BELOW).double()
        if targets.dim() != 1:  # probability rows: no given class to disagree with
            return out
        given = targets.detach().cpu().long()
        clean = clean_labels.detach().cpu().long()
        known = clean >= 0
        out[:, 6] = known.double()
        out[:, 7] = (known & (clean != given)).double()
        if logits is not None:
            predicted = logits.detach().argmax(1).cpu()
            out[:, 4] = 1.0
            out[:, 5] = (predicted != given).double()
            out[:, 8] = known.double()
            out[:, 9] = (known & (predicted != clean)).double()
        return out

    def as_rows(self) -> tuple[dict[str, list[float]], list[list[float]]]:
        """Plain lists, for all_gather_object."""
        return {n: t.row() for n, t in self.sources.items()}, [t.row() for t in self.classes]


@dataclass
class LabelQuality:
    """The job's label-quality totals (checkpointed; the same on every rank): per source, at most
    ``max_sources`` names plus "other", and per given class."""

    sources: dict[str, Tally] = field(default_factory=dict)
    classes: list[Tally] = field(default_factory=list)

    def merge(self, windows: Iterable[tuple[Mapping[str, Sequence[float]], Sequence[Sequence[float]]]],
              *, max_sources: int) -> None:
        """Add every rank's window (:meth:`LabelWindow.as_rows`, in rank order), then fold the
        sources past the ``max_sources`` largest into "other"."""
        for sources, classes in windows:
            for name, row in sources.items():
                self.sources.setdefault(name, Tally()).add_row(row)
            if classes and not self.classes:
                self.classes = [Tally() for _ in classes]
            for tally, row in zip(self.classes, classes, strict=bool(classes)):
                tally.add_row(row)
        _fold(self.sources, max_sources)

    def model_error(self, eval_accuracy: float | None = None) -> float | None:
        """The model's error ``e`` of the calibration (module docstring): against clean labels
        where records carried them, else 1 - ``eval_accuracy``, else None (read as 0)."""
        checked = sum(t.checked for t in self.sources.values())
        if checked:
            return sum(t.mistaken for t in self.sources.values()) / checked
        return 1.0 - eval_accuracy if eval_accuracy is not None else None

    def report(self, num_classes: int, eval_accuracy: float | None = None) -> dict[str, Any]:
        """The JobReport fields ``sources`` (by records, most first), ``classes`` and
        ``label_model_error``."""
        error = self.model_error(eval_accuracy)
        e = error if error is not None else 0.0
        ranked = sorted(self.sources.items(), key=lambda item: (-item[1].seen, item[0]))
        return {"sources": [SourceQuality(source=name, **t.quality_fields(e, num_classes)) for name, t in ranked],
                "classes": [ClassQuality(label=k, **t.quality_fields(e, num_classes))
                            for k, t in enumerate(self.classes) if t.seen],
                "label_model_error": error}

    def as_payload(self) -> dict[str, Any]:
        """Plain containers for the checkpoint: {"sources": {name: row}, "classes": [row, ...]}."""
        return {"sources": {n: t.row() for n, t in self.sources.items()}, "classes": [t.row() for t in self.classes]}

    @classmethod
    def from_payload(cls, payload: Any) -> LabelQuality:
        """Read :meth:`as_payload` back; raises CheckpointError when it is malformed."""
        if not isinstance(payload, dict) or set(payload) != {"sources", "classes"}:
            raise CheckpointError("checkpoint label_quality must be {'sources': {...}, 'classes': [...]}")
        sources, classes = payload["sources"], payload["classes"]
        if not isinstance(sources, dict) or not isinstance(classes, list):
            raise CheckpointError("checkpoint label_quality holds a dict of sources and a list of classes")
        out = cls()
        for name, row in sources.items():
            out.sources[_checked_name(name)] = _tally(row, f"source {name!r}")
        out.classes = [_tally(row, f"class {k}") for k, row in enumerate(classes)]
        return out


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"checkpoint label_quality has a source name {name!r} that is not a string")
    return name


def _tally(row: Any, what: str) -> Tally:
    if (not isinstance(row, list) or len(row) != len(TALLY_FIELDS)
            or not all(isinstance(v, (int, float)) and v >= 0 for v in row)):
        raise CheckpointError(f"checkpoint label_quality of {what} is not {len(TALLY_FIELDS)} non-negative counts")
    tally = Tally()
    tally.add_row(row)
    return tally
