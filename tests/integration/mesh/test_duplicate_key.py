"""Two nodes holding one secret key (every replica mounting the same Secret) are named
loudly, on the peer that sees both and on the nodes themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import NodeProcess, make_certs, wait_until


def test_two_nodes_with_one_key_are_logged_on_both_sides(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    certs = make_certs(tmp_path / "certs", ["hub", "pod"])
    shutil.copy(certs / "pod.key_secret", certs / "pod2.key_secret")  # the same key, copied
    hub = NodeProcess(tmp_path, "hub", certs)
    nodes.append(hub)
    nodes.append(NodeProcess(tmp_path, "pod", certs, seeds=[hub.control_port]))
    nodes.append(NodeProcess(tmp_path, "pod2", certs, seeds=[hub.control_port]))
    wait_until(lambda: "two nodes present the key" in hub.output(), 30, "the hub to name the shared key")
    # Both holders, whatever the order of their hellos: the hub's hellos (to one of them)
    # and its welcomes (to each, answering its hello) name both addresses for the key.
    wait_until(lambda: all("uses OUR key" in n.output() for n in nodes[1:]), 30,
               "both holders of the shared key to say so")
