"""Model registry shapes and the dataset readers on small files the tests write."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.data.datasets import DatasetError, load_cifar10, load_fashion_mnist, read_idx
from workers.errors import ModelError
from workers.train.models import MODEL_PACKAGES_ENV, allowed_model_packages, build_model


@pytest.mark.parametrize("name,in_shape", [("mlp", (1, 28, 28)), ("small_cnn", (1, 28, 28)),
                                           ("small_cnn", (3, 32, 32)), ("preact_resnet18", (3, 32, 32))])
def test_models_output_logits(name: str, in_shape: tuple[int, ...]) -> None:
    model = build_model(name, in_shape=in_shape, num_classes=7)
    assert model(torch.randn(2, *in_shape)).shape == (2, 7)


def test_unknown_model_lists_registered_names() -> None:
    with pytest.raises(ModelError, match="registered models: \\['mlp', 'preact_resnet18', 'small_cnn'\\]"):
        build_model("resnet9000", in_shape=(3, 32, 32), num_classes=10)


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def test_fashion_mnist_reader(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    labels = np.array([9, 0, 4])
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))  # uncompressed works too
    data = load_fashion_mnist(tmp_path, split="test")
    assert data.images.shape == (3, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert data.labels.tolist() == [9, 0, 4]
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, split="train")


def test_idx_reader_rejects_truncated_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(_idx_bytes(np.zeros((4, 2)))[:-3])
    with pytest.raises(DatasetError, match="header says"):
        read_idx(bad)


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_cifar_reader_tarball_and_cache(tmp_path: Path) -> None:
    tar_path = tmp_path / "cifar.tar.gz"
    files = {"cifar10/train/truck/0001.jpg": (10, 20, 250), "cifar10/train/airplane/0001.jpg": (250, 0, 0),
             "cifar10/test/cat/0001.jpg": (0, 255, 0)}
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, colour in files.items():
            data = _jpeg(colour)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    train = load_cifar10(tar_path, split="train", cache_dir=tmp_path / "cache")
    assert train.images.shape == (2, 3, 32, 32)
    assert train.labels.tolist() == [0, 9]  # airplane, truck
    assert int(train.images[0, 0].float().mean()) > 200  # red channel of the red image
    assert list((tmp_path / "cache").glob("*.npz"))
    again = load_cifar10(tar_path, split="train", cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, train.images)
    assert load_cifar10(tar_path, split="test").labels.tolist() == [3]
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "missing.tar.gz")


def test_model_from_an_allow_listed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "acme_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n"
        "def linear(in_shape, num_classes, *, bias=True):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_shape[0], num_classes, bias=bias))\n"
        "not_a_factory = 3\n"
        "def checked(in_shape, num_classes, *, width=1):\n"
        "    if width < 1:\n"
        "        raise ValueError('width must be at least 1')\n"
        "    return torch.nn.Linear(in_shape[0], num_classes)\n"
        "def not_a_module(in_shape, num_classes):\n"
        "    return 'nope'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(MODEL_PACKAGES_ENV, "acme_models, other")
    allowed = allowed_model_packages()
    assert allowed == ("acme_models", "other")
    model = build_model("acme_models.nets:linear", in_shape=(5,), num_classes=3, allowed_packages=allowed,
                        bias=False)
    assert model(torch.randn(2, 5)).shape == (2, 3) and model[1].bias is None
    with pytest.raises(ModelError, match="is not allow-listed"):  # the default allow-list is empty
        build_model("acme_models.nets:linear", in_shape=(5,), num_classes=3)
    for name, message in [("acme_models.nets:missing", "has no attribute 'missing'"),
                          ("acme_models.absent:f", "cannot import"),
                          ("acme_models.nets:not_a_factory", "is not callable"),
                          ("acme_models.nets:not_a_module", "not a torch.nn.Module"),
                          ("os:getcwd", "package 'os' is not allow-listed"),
                          ("acme_models.nets:", "unknown model")]:
        with pytest.raises(ModelError, match=message):
            build_model(name, in_shape=(5,), num_classes=3, allowed_packages=allowed)
    with pytest.raises(ModelError, match="unexpected keyword argument 'width'"):
        build_model("acme_models.nets:linear", in_shape=(5,), num_classes=3, allowed_packages=allowed, width=3)
    with pytest.raises(ModelError, match=r"model 'acme_models\.nets:checked': width must be at least 1"):
        build_model("acme_models.nets:checked", in_shape=(5,), num_classes=3, allowed_packages=allowed, width=0)
