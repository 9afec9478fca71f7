"""``cicw-stream demo`` (what ``make demo`` runs): the main job end to end on embedded defaults.

Starts the embedded broker, streams a dataset into it with 40% symmetric label noise (the true
label kept in a header), streams a clean evaluation split beside it, and trains a bounded CICW-M
job on a local Ray with two workers. The summary shows how well the weights found the corrupted
labels (noise precision / recall) and the accuracy on clean data. Fashion-MNIST when its Debian
package is installed, else a synthetic 10-class problem of the same shape (no download needed).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workers.data.datasets import FASHION_MNIST_DIR
from workers.data.produce import ProduceSpec, produce
from workers.kafka.topics import ensure_topic
from workers.report import JobReport, JobResult
from workers.runner import run_job
from workers.spec import JobSpec

TOPIC, EVAL_TOPIC = "demo", "demo-test"


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 1, 28, 28] uint8 images of 10 classes (a noisy class template each) and labels [n]."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(12345).integers(0, 256, (10, 1, 28, 28))
    y = rng.integers(0, 10, n)
    x = np.clip(0.6 * templates[y] + rng.normal(0, 60, (n, 1, 28, 28)) + 50, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


def _produce_data(bootstrap: str, records: int, noise_rate: float, workdir: Path) -> tuple[str, int]:
    """Fill the train and evaluation topics; returns what the data is and how many train records."""
    from confluent_kafka import Producer

    if FASHION_MNIST_DIR.exists():
        base: dict[str, Any] = {"dataset": "fashion_mnist"}
        origin = "Fashion-MNIST"
        train, test = base, {**base, "split": "test"}
    else:
        for name, n, seed in (("train", records, 0), ("test", 2000, 1)):
            x, y = synthetic_images(n, seed)
            np.savez(workdir / f"{name}.npz", x=x, y=y)
        origin = "synthetic 10-class images (install dataset-fashion-mnist for Fashion-MNIST)"
        train = {"dataset": "npz", "path": str(workdir / "train.npz")}
        test = {"dataset": "npz", "path": str(workdir / "test.npz")}
    written = []
    for topic, extra, limit, noise in ((TOPIC, train, records, noise_rate), (EVAL_TOPIC, test, 2000, 0.0)):
        spec = ProduceSpec(bootstrap_servers=bootstrap, topic=topic, limit=limit, format="raw",
                           noise="symmetric" if noise else "none", rate=noise, **extra)
        report = produce(spec, Producer({"bootstrap.servers": bootstrap}),
                         partitions=ensure_topic(bootstrap, topic, 4))
        written.append(report.records)
    return origin, written[0]


def demo_spec(bootstrap: str, checkpoints: str, workers: int) -> JobSpec:
    """The demo's job: bounded, MLP, CICW-M after a short burn-in, clean eval every 20 steps."""
    return JobSpec.model_validate({
        "job_id": "demo",
        "source": {"bootstrap_servers": bootstrap, "topic": TOPIC, "stop_at": "end", "batch_size": 128},
        "codec": {"format": {"kind": "raw", "dtype": "uint8", "scale": 1 / 255}, "input_shape": [1, 28, 28],
                  "num_classes": 10},
        "model": {"name": "mlp"},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "cicw": {"method": "cicw_m", "burn_in_steps": 20, "anneal_steps": 20},
        "evaluation": {"topic": EVAL_TOPIC, "every_steps": 20},
        "scaling": {"num_workers": workers},
        "checkpoint": {"every_steps": 50, "keep": 2, "storage_path": checkpoints},
    })


def run_demo(*, records: int, noise_rate: float, checkpoints: str, workers: int,
             on_report: Callable[[JobReport], None] | None = None,
             say: Callable[[str], None] = print) -> JobResult:
    """Broker up, data in, job run, broker down; returns the job's result (Ray must be
    initialised: see workers.runner.connect_ray)."""
    from workers.kafka.broker import EmbeddedBroker

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="cicw-demo-") as workdir:
        say(f"embedded broker at {broker.bootstrap}")
        origin, written = _produce_data(broker.bootstrap, records, noise_rate, Path(workdir))
        say(f"{written} records of {origin} in topic {TOPIC!r} with {noise_rate:.0%} of labels flipped "
            f"(true label in the clean_label header); 2000 clean ones in {EVAL_TOPIC!r}")
        # A fresh lineage each time: the demo's broker starts empty, so an old checkpoint's
        # offsets would point past its data.
        shutil.rmtree(Path(checkpoints) / "demo", ignore_errors=True)
        return run_job(demo_spec(broker.bootstrap, str(checkpoints), workers), on_report=on_report)
