"""One checkpoint directory = ``state.pt`` (a :class:`TrainState`: model, optimizer, LR schedule,
CICW schedule, counters, generator states and the meta with every partition's next offset, in
one file so they can never disagree) and ``meta.json`` (the same meta, readable without torch)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint_meta import read_bytes, write_meta
from .state import TrainState

STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: TrainState) -> Path:
    """Write ``state`` into ``directory`` (state.pt, then meta.json); returns state.pt's path."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state.as_payload(), tmp)
    tmp.replace(path)  # a reader never sees half a file
    write_meta(directory, state.meta)
    return path


def load_state(location: str | Path) -> TrainState:
    """Read a checkpoint written by :func:`save_state`, from a local directory or a pyarrow
    filesystem URI (``s3://bucket/.../checkpoint_...``, credentials and endpoint from the
    standard AWS environment), tensors onto the CPU.

    Loads with ``weights_only=True``: tensors and plain containers, never arbitrary objects.
    Raises CheckpointError when the file cannot be read or breaks an invariant (another format
    version, counters that disagree with the meta, offsets outside the topic, ...).
    """
    raw = read_bytes(location, STATE_FILE)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # what torch raises for a bad file
        raise CheckpointError(f"{STATE_FILE} of checkpoint {location} cannot be loaded safely: {exc}") from exc
    return TrainState.from_payload(payload)
