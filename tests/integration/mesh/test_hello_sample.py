"""No message carries the whole member list (issue 16): a hello names at most HELLO_PEERS
members, and a peer that just joined gets every member once, in the welcome that answers
its first hello (push-pull on join). Five embedded nodes joining through one seed, with
the bound made 2 so that the sample is smaller than the mesh: all of them still find all
the others, and their hellos name 2 members, not 4."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers import make_certs
from zmesh import Node
from zmesh.config import NodeConfig, load_config
from zmesh.mesh import mesh as mesh_module

pytestmark = pytest.mark.timeout(60)

NAMES = ["seed", "n1", "n2", "n3", "n4"]


def _config(certs: Path, name: str, seeds: list[str]) -> NodeConfig:
    return load_config(None, {
        "node.name": name, "mesh.cert": str(certs / f"{name}.key_secret"), "mesh.trusted": str(certs),
        "mesh.listen": "127.0.0.1:0", "mesh.peers": seeds, "mqtt.listen": "", "mesh.heartbeat_interval": "0.2",
    })


def test_hellos_name_a_bounded_sample_and_a_joiner_still_learns_everyone(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh_module, "HELLO_PEERS", 2)
    monkeypatch.setattr(mesh_module, "RECENT_HEARTBEATS", 0)  # no "recently changed" members: the sample only
    certs = make_certs(tmp_path / "certs", NAMES)

    async def main() -> tuple[list[int], list[int]]:
        async with Node(config=_config(certs, "seed", [])) as seed:
            seeds = [f"127.0.0.1:{seed.control_port}"]
            async with Node(config=_config(certs, "n1", seeds)) as n1, Node(config=_config(certs, "n2", seeds)) as n2, \
                    Node(config=_config(certs, "n3", seeds)) as n3, Node(config=_config(certs, "n4", seeds)) as n4:
                nodes = [seed, n1, n2, n3, n4]
                await asyncio.gather(*(n.wait_for_peers(4, timeout=20) for n in nodes))
                sampled = []
                for n in nodes:
                    assert n.mesh is not None
                    n.mesh._peer_list_at = None  # a fresh draw (the list is kept for one tick)
                    sampled.append(len(n.mesh._hello().peers))
                full = [len(n.mesh._hello(full=True).peers) for n in nodes if n.mesh is not None]
                return sampled, full

    sampled, full = asyncio.run(main())
    assert full == [4] * 5  # every node knows every other
    assert sampled == [2] * 5  # but says only two of them per hello
