"""`cicw-stream demo` (what `make demo` runs): embedded broker, noisy records, a bounded job on a
real local Ray, through the command line. Runs on the synthetic data a fresh machine gets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import service.demo
from service.cli import main as cli_main

pytestmark = pytest.mark.slow


def _refuse_nan(constant: str) -> None:
    raise AssertionError(f"{constant} in JSON output")


@pytest.fixture
def no_ray_running() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()  # the command started its own local Ray


def test_synthetic_images_are_learnable_classes() -> None:
    x, y = service.demo.synthetic_images(500, seed=0)
    assert x.shape == (500, 1, 28, 28) and x.dtype == np.uint8 and set(y.tolist()) == set(range(10))
    # Nearest class mean (from another draw) beats chance by far: the classes carry signal.
    xt, yt = service.demo.synthetic_images(2000, seed=1)
    means = np.stack([xt[yt == c].reshape(-1, 784).mean(0) for c in range(10)])
    pred = np.argmin(((x.reshape(-1, 1, 784).astype(float) - means) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() > 0.5


def test_demo_command_trains_on_embedded_defaults(no_ray_running: None, tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                  capsys) -> None:
    monkeypatch.setattr(service.demo, "FASHION_MNIST_DIR", tmp_path / "absent")  # as on a fresh machine
    code = cli_main(["demo", "--records", "1536", "--checkpoints", str(tmp_path / "ckpt"), "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1], parse_constant=_refuse_nan)
    assert summary["state"] == "finished" and summary["error"] is None
    assert summary["report"]["examples"] == 1536 and summary["report"]["eval_examples"] == 2000
    assert summary["checkpoint_step"] == summary["report"]["step"] > 0
    assert summary["checkpoint"].startswith(str(tmp_path / "ckpt" / "demo"))
    assert "synthetic 10-class images" in err and "embedded broker at 127.0.0.1:" in err


def test_demo_command_rejects_bad_arguments_naming_them(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_main(["demo", "--records", "0", "--noise-rate", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--records must be at least 1, got 0" in err and "--noise-rate must be in [0, 1), got 1.5" in err
