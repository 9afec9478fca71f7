"""Readers for the labelled datasets the benchmarks and the producer stream. Each takes a path;
nothing is downloaded."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DatasetError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_IDX_DTYPES: dict[int, type | str] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class LabelledImages:
    """images: [N, C, H, W] uint8; labels: [N] int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise DatasetError(f"{path}: header says {dims} ({expected} bytes), body has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def load_fashion_mnist(root: str | os.PathLike[str] = FASHION_MNIST_DIR, *, split: str = "train") -> LabelledImages:
    """Fashion-MNIST as [N, 1, 28, 28] uint8 images and labels; ``split`` is "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).exists():
                return root / name
        raise DatasetError(f"{root / stem}(.gz) not found; on Debian: apt-get install dataset-fashion-mnist")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return LabelledImages(torch.from_numpy(images.copy()).unsqueeze(1),
                          torch.from_numpy(labels.astype(np.int64)))


def load_cifar10(source: str | os.PathLike[str], *, split: str = "train",
                 cache_dir: str | os.PathLike[str] | None = None) -> LabelledImages:
    """CIFAR-10 from a tarball or folder of ``<split>/<class>/NNNN.jpg`` files.

    Returns [N, 3, 32, 32] uint8 images, ordered by class then file name. Decoding 60,000 JPEGs
    takes a while, so with ``cache_dir`` the decoded arrays are kept in an .npz keyed by the
    source's name, size and modification time.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"CIFAR-10 source {source} does not exist")
    cache = None
    if cache_dir is not None:
        st = source.stat()
        cache = Path(cache_dir) / f"cifar10-{source.name}-{st.st_size}-{int(st.st_mtime)}-{split}.npz"
        if cache.exists():
            with np.load(cache) as z:
                return LabelledImages(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]))
    files = _cifar_files(source, split)
    if not files:
        raise DatasetError(f"no {split}/<class>/*.jpg files in {source}")
    images = np.stack([_decode_rgb32(data, name) for name, data in files])
    labels = np.array([CIFAR10_CLASSES.index(name.split("/")[-2]) for name, _ in files], dtype=np.int64)
    images = images.transpose(0, 3, 1, 2).copy()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache behind
    return LabelledImages(torch.from_numpy(images), torch.from_numpy(labels))


def _cifar_files(source: Path, split: str) -> list[tuple[str, bytes]]:
    def wanted(name: str) -> bool:
        parts = name.strip("./").split("/")
        return (len(parts) >= 3 and parts[-3] == split and parts[-2] in CIFAR10_CLASSES
                and parts[-1].lower().endswith((".jpg", ".jpeg", ".png")))

    out: list[tuple[str, bytes]] = []
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            if path.is_file() and wanted(rel):
                out.append((rel, path.read_bytes()))
        return out
    try:
        with tarfile.open(source) as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    out.append((member.name, tar.extractfile(member).read()))  # type: ignore[union-attr]
    except tarfile.TarError as exc:
        raise DatasetError(f"cannot read tarball {source}: {exc}") from exc
    return sorted(out, key=lambda item: (CIFAR10_CLASSES.index(item[0].split("/")[-2]), item[0]))


def _decode_rgb32(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot decode image {name}: {exc}") from exc
    if arr.shape != (32, 32, 3):
        raise DatasetError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
    return arr
