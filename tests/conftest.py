"""Shared fixtures. The broker is started once per test session on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from workers.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A running embedded broker; tests create their own uniquely named topics."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker
