"""A retained frame lost in transit reaches the peer anyway, by the next hellos.

ZeroMQ's PUB drops frames for a SUB that is still connecting, so a retained value written
just as a node joins can miss it, and if nothing else is ever written there is no gap in
the sequence to notice. Hellos carry the sender's retained sequence; a peer that stays
behind it asks for a resync. Periodic anti-entropy is pushed out of the way (an hour) so
only that mechanism can bring the value."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.helpers import make_certs
from tests.integration.test_python_api import await_route
from zmesh import Node
from zmesh.config import NodeConfig, load_config

pytestmark = pytest.mark.timeout(60)


def _config(certs: Path, name: str, seeds: list[str]) -> NodeConfig:
    return load_config(None, {
        "node.name": name, "mesh.cert": str(certs / f"{name}.key_secret"), "mesh.trusted": str(certs),
        "mesh.listen": "127.0.0.1:0", "mesh.peers": seeds, "mqtt.listen": "",
        "mesh.heartbeat_interval": "0.2", "retained.anti_entropy_interval": "3600",
    })


@asynccontextmanager
async def two_nodes(certs: Path) -> AsyncIterator[tuple[Node, Node]]:
    async with Node(config=_config(certs, "one", [])) as one:
        async with Node(config=_config(certs, "two", [f"127.0.0.1:{one.control_port}"])) as two:
            await asyncio.gather(one.wait_for_peers(1), two.wait_for_peers(1))
            yield one, two


async def _retained_on(node: Node, topic: str, timeout: float) -> bytes:
    """The retained value a fresh subscriber on ``node`` is handed, waiting up to ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            async with node.subscribe(topic) as subscription:
                try:
                    return (await subscription.get(timeout=0.1)).payload
                except TimeoutError:
                    continue


def test_a_lost_retained_frame_is_recovered_from_the_hellos(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["one", "two"])

    async def main() -> tuple[bytes, int, int]:
        async with two_nodes(certs) as (one, two):
            assert two.mesh is not None
            # The live path up first (two's SUB connected to one's PUB, which is what drops
            # frames until then), so the frame below is lost only because the test drops it.
            probes = two.subscribe("gap/probe")
            await await_route(one, probes, "gap/probe")
            probes.close()
            mesh = two.mesh
            deliver = mesh._on_retained_frame
            lost: list[bytes] = []

            def drop_the_next_one(link: object, frame: bytes) -> None:
                if not lost and b"gap/lost" in frame:
                    lost.append(frame)  # as PUB drops it for a SUB still connecting
                    return
                deliver(link, frame)  # type: ignore[arg-type]

            mesh._on_retained_frame = drop_the_next_one  # type: ignore[method-assign]
            gaps_before = mesh.stats["retained_gaps"]
            await one.publish("gap/lost", b"v", retain=True)
            value = await _retained_on(two, "gap/lost", 10)
            return value, len(lost), mesh.stats["retained_gaps"] - gaps_before

    value, lost, gaps = asyncio.run(main())
    assert lost == 1, "the frame was not dropped: the test did not test the recovery"
    assert value == b"v"
    assert gaps >= 1  # found by the hello check (anti-entropy is an hour away)
