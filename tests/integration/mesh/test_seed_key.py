"""Joining in O(1) (issue 16, docs/cluster-scale.md §5): a seed written ``KEY@HOST:PORT`` is
dialled once, with that key, however many keys the node trusts; a bare ``HOST:PORT`` seed
still works and still costs one dial per trusted key. Real node processes; the dials are
read from the node's own counter (``seed_dials`` in ``$SYS/zmesh/node``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, load_keys, make_certs, stop_all, wait_until, zmesh_cli

pytestmark = pytest.mark.timeout(120)

OTHERS = 50  # trusted keys of nodes that are not running: each costs a bare seed one dial


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = ["seed", "joiner", "bare", *(f"other{i:02d}" for i in range(OTHERS))]
    return make_certs(tmp_path_factory.mktemp("seedkey") / "certs", names)


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    stop_all(started)


def public_key(certs: Path, name: str) -> str:
    return load_keys(certs / f"{name}.key")[0].decode()


def seed_dials(node: NodeProcess) -> int:
    value: int = node.sys_value("$SYS/zmesh/node")["stats"]["seed_dials"]
    return value


def test_a_keyed_seed_is_dialled_once_and_a_bare_one_once_per_trusted_key(
    certs: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    ring = len(list(certs.glob("*.key")))
    assert ring == OTHERS + 3
    seed = NodeProcess(tmp_path, "seed", certs)
    nodes.append(seed)
    keyed = f"{public_key(certs, 'seed')}@127.0.0.1:{seed.control_port}"
    joiner = NodeProcess(tmp_path, "joiner", certs, extra=["--peer", keyed])
    nodes.append(joiner)
    wait_until(lambda: "seed" in joiner.peers_up(), 15, "the joiner to see the seed up")
    assert seed_dials(joiner) == 1

    # The old form, same ring: every trusted key but our own is tried at the address.
    bare = NodeProcess(tmp_path, "bare", certs, seeds=[seed.control_port])
    nodes.append(bare)
    wait_until(lambda: "seed" in bare.peers_up(), 15, "the bare-seeded node to see the seed up")
    assert seed_dials(bare) == ring - 1
    # And the keyed joiner still learns the bare one through the seed (peer exchange), with
    # no further seed dial.
    wait_until(lambda: "bare" in joiner.peers_up(), 15, "the joiner to see the bare-seeded node")
    assert seed_dials(joiner) == 1


def _run(certs: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    result = zmesh_cli(
        "node", "run", "--name", "joiner", "--cert", str(certs / "joiner.key_secret"),
        "--trusted", str(certs), "--listen", "127.0.0.1:0", "--mqtt", "",
        "--ready-file", str(tmp_path / "never.ready"), *args, timeout=20,  # a node that starts runs on
    )
    assert not (tmp_path / "never.ready").exists()
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


def test_a_seed_key_that_is_not_trusted_stops_the_node_naming_the_flag_and_the_key(
    certs: Path, tmp_path: Path
) -> None:
    stranger = load_keys(make_certs(tmp_path / "stranger", ["stranger"]) / "stranger.key")[0].decode()
    code, err = _run(certs, tmp_path, "--peer", "127.0.0.1:7100", "--peer", f"{stranger}@127.0.0.1:7101")
    assert code == 1
    assert "<command line>: mesh.peers (--peer): item 1:" in err, err
    assert f"the key {stranger} is not among the trusted keys in {certs}" in err, err


def test_a_seed_key_that_is_not_trusted_in_a_file_names_the_file_and_the_key(
    certs: Path, tmp_path: Path
) -> None:
    stranger = load_keys(make_certs(tmp_path / "stranger", ["stranger"]) / "stranger.key")[0].decode()
    config = tmp_path / "node.toml"
    config.write_text(f'[mesh]\npeers = ["{stranger}@127.0.0.1:7101"]\n')
    code, err = _run(certs, tmp_path, "--config", str(config))
    assert code == 1
    assert f"{config}: mesh.peers: item 0:" in err, err
    assert f"the key {stranger} is not among the trusted keys" in err, err


def test_a_seed_key_that_is_our_own_stops_the_node(certs: Path, tmp_path: Path) -> None:
    own = public_key(certs, "joiner")
    code, err = _run(certs, tmp_path, "--peer", f"{own}@127.0.0.1:7101")
    assert code == 1
    assert f"the key {own} is this node's own" in err, err


def test_a_malformed_seed_key_on_the_command_line_is_refused_before_start(certs: Path, tmp_path: Path) -> None:
    code, err = _run(certs, tmp_path, "--peer", "not-a-key@127.0.0.1:7101")
    assert code == 2  # a configuration error, as for any bad flag
    assert "<command line>: mesh.peers: item 0: 'not-a-key@127.0.0.1:7101'" in err, err
    assert "40-character z85 CURVE public key" in err, err


def test_doctor_shows_the_keyed_form_of_a_bare_seed_and_checks_a_given_key(
    certs: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    import asyncio

    from zmesh.cli.doctor import Check, run_checks
    from zmesh.config import load_config

    seed = NodeProcess(tmp_path, "seed", certs)
    nodes.append(seed)
    seed_key, wrong_key = public_key(certs, "seed"), public_key(certs, "other00")
    stranger = load_keys(make_certs(tmp_path / "stranger", ["stranger"]) / "stranger.key")[0].decode()
    address = f"127.0.0.1:{seed.control_port}"
    config = load_config(None, {
        "node.name": "joiner", "mesh.cert": str(certs / "joiner.key_secret"), "mesh.listen": "127.0.0.1:0",
        "mqtt.listen": "", "mesh.peers": [address, f"{seed_key}@{address}", f"{wrong_key}@{address}",
                                          f"{stranger}@{address}"],
    })
    checks: list[Check] = []
    asyncio.run(run_checks(config, checks.append))
    seeds = {c.what.split(": ", 1)[0].removeprefix("seed "): c for c in checks if c.what.startswith("seed ")}
    assert seeds[address].ok and f"as {seed_key}@{address} it is dialled once" in seeds[address].what
    keyed = seeds[f"{seed_key}@{address}"]
    assert keyed.ok and "node seed" in keyed.what and "dialled once" not in keyed.what
    assert not seeds[f"{wrong_key}@{address}"].ok
    assert "no CURVE handshake with the key given" in seeds[f"{wrong_key}@{address}"].what
    assert not seeds[f"{stranger}@{address}"].ok
    assert "not among the trusted keys" in seeds[f"{stranger}@{address}"].what


def test_with_a_mesh_authority_a_keyed_seed_needs_no_trusted_key_and_is_asked_who_it_is(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    from tests.helpers import write_config
    from tests.integration.security.test_identity_mesh import Authority, port_pair, start

    authority = Authority(tmp_path / "ca")
    signer = authority.signer("pods")
    seed = start(tmp_path, "seed", authority, signer=signer)
    nodes.append(seed)
    key = seed.sys_value("$SYS/zmesh/node")["key"]  # made at start: in no trusted directory
    config = write_config(tmp_path / "joiner.toml",
                          f'[mesh]\nauthority = "{authority.public}"\nsigner = "{signer}"\n'
                          f'peers = ["{key}@127.0.0.1:{seed.control_port}"]\n')
    joiner = NodeProcess(tmp_path, "joiner", tmp_path, control_port=port_pair(),
                         extra=["--config", str(config)], keys=False)
    nodes.append(joiner)
    wait_until(lambda: "seed" in joiner.peers_up(), 15, "the joiner to see the seed up")
    assert seed_dials(joiner) == 0  # asked who it is (identity port), then one handshake
