"""One checkpoint = model + optimizer + LR scheduler + CICW schedule + counters + the next offset
of every partition, written as one file so they can never disagree."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_VERSION = 1
STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (with a format version) into ``directory``; returns the file written."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_state(location: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state`, from a local directory or a pyarrow
    filesystem URI (``s3://bucket/.../checkpoint_...``, credentials and endpoint from the
    standard AWS environment); refuses unknown format versions."""
    if "://" in str(location):
        from pyarrow.fs import FileSystem

        fs, path = FileSystem.from_uri(str(location))
        with fs.open_input_file(f"{path.rstrip('/')}/{STATE_FILE}") as f:
            source: Any = io.BytesIO(f.read())
    else:
        source = Path(location) / STATE_FILE
    state = torch.load(source, map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint format version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
    return state
