"""Shared fixtures: real node processes on loopback with random ports and real CURVE keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, make_certs


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A trusted directory with certificates for nodes a, b, c (secrets included)."""
    return make_certs(tmp_path / "certs", ["a", "b", "c"])


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Collects node processes started by a test and stops them all afterwards."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()
