"""Shared fixtures. The broker is started once per test session on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from workers.kafka.broker import EmbeddedBroker

# Property and fuzz tests explore new inputs on every developer run; CI replays a fixed set, so a
# red CI always names a reproducible failure (a newly found one is fixed, then kept as an example).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Ray Train's controller polls its workers this often (default 2 s): a job's end, and any report
# that finds the previous one not yet taken, wait for the next poll. The jobs in these tests are
# seconds long and checkpoint every few steps; polling faster keeps each from idling for seconds.
# Set before any TorchTrainer exists: Ray hands the driver's value to its controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A running embedded broker; tests create their own uniquely named topics."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker
