"""Stream a labelled dataset into a topic, optionally with synthetic label noise. The true label
travels in a header (``clean_label``) so training can measure how well the weights find the
noise."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from cicw.noise import CIFAR10_ASYMMETRIC_MAP, corrupt_labels

from ..kafka.producing import Producer, produce_waiting
from .datasets import FASHION_MNIST_DIR, DatasetError, load_cifar10, load_fashion_mnist


class ProduceSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str
    topic: str
    dataset: Literal["fashion_mnist", "cifar10", "npz", "csv"]
    path: str | None = Field(None, description="File or folder; Fashion-MNIST defaults to the Debian package's.")
    split: Literal["train", "test"] = "train"
    format: Literal["raw", "json", "image"] = "raw"
    noise: Literal["none", "symmetric", "uniform", "asymmetric"] = "none"
    rate: float = Field(0.0, ge=0, le=1, description="Noise rate.")
    class_map: dict[int, int] | None = Field(None, description="Asymmetric noise map (CIFAR-10's by default).")
    seed: int = 0
    passes: PositiveInt = 1
    limit: NonNegativeInt | None = Field(None, description="Use only the first N examples.")
    records_per_s: PositiveFloat | None = Field(None, description="Rate limit; None: as fast as possible.")
    partitions: PositiveInt = Field(4, description="Partitions if the topic has to be created.")
    label_header: str = "label"
    clean_label_header: str = "clean_label"


@dataclass(frozen=True)
class ProduceReport:
    records: int
    corrupted: int
    seconds: float


def load_examples(spec: ProduceSpec) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, ...] (uint8 images or float32) and int64 labels [N]."""
    if spec.dataset == "fashion_mnist":
        data = load_fashion_mnist(spec.path or FASHION_MNIST_DIR, split=spec.split)
        return data.images.numpy(), data.labels.numpy()
    if spec.dataset == "cifar10":
        if spec.path is None:
            raise DatasetError("cifar10 needs --path (the JPEG tarball or folder)")
        data = load_cifar10(spec.path, split=spec.split)
        return data.images.numpy(), data.labels.numpy()
    if spec.path is None:
        raise DatasetError(f"{spec.dataset} needs --path")
    if spec.dataset == "npz":
        with np.load(spec.path) as z:
            if "x" not in z or "y" not in z:
                raise DatasetError(f"{spec.path}: an npz needs arrays 'x' (features) and 'y' (labels)")
            return z["x"], z["y"].astype(np.int64)
    return _read_csv(Path(spec.path))


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Numeric CSV; the label is the column named 'label', else the last; a header row is optional."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise DatasetError(f"{path} is empty")
    header = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    col = header.index("label") if header and "label" in header else len(rows[0]) - 1
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{path}: non-numeric value ({exc})") from exc
    return np.delete(table, col, axis=1).astype(np.float32), table[:, col].astype(np.int64)


def encode(x: np.ndarray, fmt: str, label: int) -> bytes:
    """The record value for features ``x`` in ``fmt`` (raw keeps x's dtype, little-endian; json
    carries the label as "y", the other formats carry it in a header only)."""
    if fmt == "raw":
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
    if fmt == "json":
        return json.dumps({"x": x.tolist(), "y": label}).encode()
    from PIL import Image

    img = x.transpose(1, 2, 0) if x.ndim == 3 else x
    img = img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def produce(spec: ProduceSpec, producer: Producer, *, partitions: int | None = None,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> ProduceReport:
    """Write ``passes`` passes over the (noisy) dataset; labels go in headers (json: also "y").

    With ``partitions``, records go round-robin over them (keyless records would otherwise all
    land in one partition per producer batch); without, the client's partitioner decides.
    """
    x, clean = load_examples(spec)
    if spec.limit is not None:
        x, clean = x[: spec.limit], clean[: spec.limit]
    num_classes = int(clean.max()) + 1 if len(clean) else 2
    if spec.noise == "none" or spec.rate == 0:
        noisy = clean
    else:
        class_map = spec.class_map or (CIFAR10_ASYMMETRIC_MAP if spec.noise == "asymmetric" else None)
        noisy_t, _ = corrupt_labels(torch.from_numpy(clean), kind=spec.noise, rate=spec.rate,
                                    num_classes=max(num_classes, 2), class_map=class_map,
                                    generator=torch.Generator().manual_seed(spec.seed))
        noisy = noisy_t.numpy()
    start = clock()
    sent = 0
    for _ in range(spec.passes):
        for i in range(len(clean)):
            if spec.records_per_s is not None:
                due = start + sent / spec.records_per_s
                if (wait := due - clock()) > 0:
                    sleep(wait)
            headers = [(spec.label_header, str(int(noisy[i])).encode()),
                       (spec.clean_label_header, str(int(clean[i])).encode())]
            where = {} if partitions is None else {"partition": sent % partitions}
            produce_waiting(producer, spec.topic, value=encode(x[i], spec.format, int(noisy[i])), headers=headers,
                            **where)
            sent += 1
    remaining = producer.flush(30.0)
    if remaining:
        raise RuntimeError(f"{remaining} records not delivered to {spec.topic}")
    return ProduceReport(records=sent, corrupted=int((noisy != clean).sum()) * spec.passes,
                         seconds=clock() - start)
