"""Shared fixtures: real node processes on loopback with random ports and real CURVE keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import STARTED, NodeProcess, make_certs


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the tail of every node log that is still relevant."""
    report = yield
    if report.failed and STARTED:
        for node in STARTED:
            if node.process.poll() is None or time.time() - node.log_path.stat().st_mtime < 60:
                lines = node.log_path.read_text(errors="replace").splitlines()[-60:]
                report.sections.append((f"node {node.name} log ({node.log_path})", "\n".join(lines)))
    return report
