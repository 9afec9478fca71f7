"""A job's trained model out of its checkpoint: loaded for prediction (and kept, a few at a time),
exported as safetensors, and described by a model card.

Weights are read from state.pt with ``torch.load(weights_only=True)`` (workers.train.checkpoints),
never unpickled objects, and placed into a model built from the job's own spec.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors.torch import save as safetensors_save

from service.core.errors import Conflict
from service.jobs.checkpoints import display_location
from service.jobs.schemas import ModelCard
from workers.errors import CheckpointError, ModelError
from workers.report import JobReport
from workers.spec import JobSpec
from workers.train.checkpoints import load_state
from workers.train.models import build_model

# The safetensors metadata key holding the model card (JSON); "format": "pt" is what loaders of
# the Hugging Face ecosystem look for to read the file as PyTorch weights.
CARD_METADATA_KEY = "cicw_model_card"


class ModelUnavailable(Conflict):
    """The checkpoint exists but no model can be made of it: a corrupt or unreadable state.pt,
    weights that do not fit the model the spec builds, a model the service may not build.

    409, not 503: the cause is the stored checkpoint (or the spec) itself, and the same request
    fails the same way until it changes (a newer checkpoint, a fixed allow-list); 503 would tell
    clients to retry a request that cannot succeed.
    """

    code = "model_unavailable"


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model, ready to predict: eval mode, on the CPU, gradients off.

    ``checkpoint`` is the checkpoint's location as shown to clients (a URI's query and
    credentials stripped, see :func:`service.jobs.checkpoints.display_location`)."""

    module: torch.nn.Module
    checkpoint: str
    step: int
    examples: int
    parameters: int


class ModelCache:
    """The most recently used ``capacity`` models, keyed by checkpoint location; safe to share
    between threads (request handlers). A checkpoint folder is never rewritten (Ray Train names
    each new one afresh), so a cached model never goes stale; a newer checkpoint is a new key.

    ``model_packages``: the packages whose model factories a spec may name (the service's
    CICW_MODEL_PACKAGES, as the workers get it).
    """

    def __init__(self, *, model_packages: tuple[str, ...] = (), capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._packages = model_packages
        self._capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, spec: JobSpec, location: str) -> LoadedModel:
        """The model of the checkpoint at ``location`` (a path or URI from
        :func:`service.jobs.checkpoints.resolve_checkpoint`), built from ``spec``. Raises
        ModelUnavailable naming the cause when it cannot be made."""
        with self._lock:
            if (hit := self._models.get(location)) is not None:
                self._models.move_to_end(location)
                return hit
        # Loaded without the lock: a slow object store must not hold up requests for cached
        # models. Two requests for the same new checkpoint may both load it; one copy is kept.
        loaded = load_model(spec, location, model_packages=self._packages)
        with self._lock:
            kept = self._models.setdefault(location, loaded)
            self._models.move_to_end(location)
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
            return kept

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


def load_model(spec: JobSpec, location: str, *, model_packages: tuple[str, ...] = ()) -> LoadedModel:
    """Build ``spec``'s model and load the weights of the checkpoint at ``location`` into it
    (strictly: every tensor present, of its shape). Raises ModelUnavailable naming the cause."""
    shown = display_location(location)
    try:
        state = load_state(location)
        state.meta.check_resumable(spec)  # written by this job, for data the spec reads the same way
        module = build_model(spec.model.name, in_shape=spec.codec.input_shape, num_classes=spec.codec.num_classes,
                             allowed_packages=model_packages, **spec.model.options)
    except (CheckpointError, ModelError) as exc:
        raise ModelUnavailable(f"checkpoint {shown}: {exc}") from exc
    try:
        module.load_state_dict(state.model)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise ModelUnavailable(f"checkpoint {shown} does not fit model {spec.model.name!r} as the spec builds "
                               f"it: {exc}") from exc
    module.eval().requires_grad_(False)
    return LoadedModel(module=module, checkpoint=shown, step=state.meta.step, examples=state.meta.examples,
                       parameters=sum(p.numel() for p in module.parameters()))


def safetensors_bytes(loaded: LoadedModel, card: ModelCard) -> bytes:
    """The model's state dict as a safetensors file, the card as JSON in its metadata under
    ``cicw_model_card``. Loads back with ``safetensors.torch.load`` and ``load_state_dict``.

    safetensors refuses tensors that share memory (tied weights); each tensor whose storage an
    earlier one already uses is copied, so every state-dict key keeps its own tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in loaded.module.state_dict().items():
        t = tensor.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        t = t.clone() if storage in seen else t.contiguous()
        seen.add(storage)
        tensors[name] = t
    return safetensors_save(tensors, metadata={CARD_METADATA_KEY: card.model_dump_json(), "format": "pt"})


def model_card(spec: JobSpec, loaded: LoadedModel, report: JobReport | None, spec_hash: str) -> ModelCard:
    """What the model is (architecture, shapes, record format, checkpoint) and how good it is by
    the job's latest ``report``: accuracy on the clean evaluation set, prequential accuracy,
    the fraction of examples the weights down-weighted (an estimate of the label noise) and the
    mean weight per class (low: a noisy class). Metrics are None without a report."""
    cicw = report.cicw if report is not None else None
    return ModelCard(
        job_id=spec.job_id, architecture=spec.model.name, model_options=dict(spec.model.options),
        num_classes=spec.codec.num_classes, input_shape=list(spec.codec.input_shape),
        record_format=spec.codec.format.model_dump(mode="json"), checkpoint=loaded.checkpoint,
        step=loaded.step, records_trained=loaded.examples,
        clean_accuracy=report.eval_accuracy if report is not None else None,
        prequential_accuracy=report.prequential_accuracy if report is not None else None,
        estimated_noise=cicw.low_weight_fraction if cicw is not None else None,
        class_mean_weight=list(cicw.class_mean_weight) if cicw is not None else [],
        spec_hash=spec_hash, parameters=loaded.parameters)
