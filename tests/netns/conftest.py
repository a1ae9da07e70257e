"""Fixtures for multi-host tests: a bridge and network namespaces (see ``netns.py``).

* ``net``: a fresh :class:`Net` per test; ``net.add_host(name) -> Host``. Torn down always:
  processes killed (SIGTERM, SIGKILL after a grace period), namespaces, veths and bridge
  deleted, also when the test fails or is interrupted.
* ``cert_dir``: an empty directory for certificates, trusted by every node.
* ``mesh``: ``mesh.certs(*names)`` then ``mesh.node(host, name, seeds=[...]) -> NodeOnHost``.

The whole directory is skipped, with the reason, where namespaces cannot be made (not root,
no ``ip``, ``ip netns add`` refused). Leftovers of earlier crashed runs are swept once per
session, before the first netns test.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_certs
from tests.netns.netns import Net, sweep, unsupported_reason
from tests.netns.node import NodeOnHost


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Skip unless namespaces work here (checked once); sweep leftovers of crashed runs."""
    reason = unsupported_reason()
    if reason:
        pytest.skip(reason)
    sweep()


@pytest.fixture
def net(netns_available: None) -> Iterator[Net]:
    network = Net()
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    directory.mkdir(mode=0o700)
    return directory


class Mesh:
    """Certificates and nodes for one test: every node trusts the same ``cert_dir``."""

    def __init__(self, net: Net, cert_dir: Path, workdir: Path) -> None:
        self.net = net
        self.cert_dir = cert_dir
        self.workdir = workdir
        self.nodes: list[NodeOnHost] = []

    def certs(self, *names: str) -> Path:
        return make_certs(self.cert_dir, list(names))

    def node(self, host: Any, name: str, seeds: list[str] | None = None, **kwargs: Any) -> NodeOnHost:
        node = NodeOnHost(host, name, self.cert_dir, self.workdir, seeds=seeds, **kwargs)
        self.nodes.append(node)
        return node


@pytest.fixture
def mesh(net: Net, cert_dir: Path, tmp_path: Path) -> Mesh:
    return Mesh(net, cert_dir, tmp_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the tail of each node's log (and say where the whole log is)."""
    report = yield
    network = getattr(item, "funcargs", {}).get("net")
    if report.failed and isinstance(network, Net):
        for host in network.hosts:
            for node in host.nodes:
                report.sections.append((f"node {node.name} on {host.name} ({host.ip}) log: {node.log_path}",
                                        node.tail(80)))
    return report
