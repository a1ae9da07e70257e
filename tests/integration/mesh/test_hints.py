"""Discovery hints grant no trust: a hint whose trusted key does not match the server at its
address never makes a member, and is dropped and counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers import make_certs
from tests.integration.test_python_api import two_nodes
from zmesh.mesh import mesh as mesh_module
from zmesh.mesh.discovery import Hint


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", ["one", "two", "three"])


def test_hint_with_a_key_that_does_not_match_the_server_is_dropped_and_counted(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mesh_module, "HINT_CONFIRM_TIMEOUT", 0.5)
    three_key = (certs / "three.key").read_text().split('public-key = "')[1].split('"')[0]

    async def main() -> tuple[int, list[str]]:
        async with two_nodes(certs) as (one, two):
            assert one.mesh is not None
            # "three" is trusted, but the server at two's address holds two's key.
            one.mesh.found(Hint("127.0.0.1", two.control_port, three_key, "three", "mdns"))
            async with asyncio.timeout(10):
                while one.mesh.stats["unconfirmed_hints"] == 0:
                    await asyncio.sleep(0.05)
            return one.mesh.stats["unconfirmed_hints"], [p["name"] for p in one.peers()]

    count, names = asyncio.run(main())
    assert count == 1
    assert names == ["two"]  # the real peer stays; the claimed one never became a member
