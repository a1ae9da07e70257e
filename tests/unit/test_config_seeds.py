"""The ``KEY@HOST:PORT`` seed form (issue 16, joining in O(1)): parsed and checked by the
config loader; malformed keys name the file (or the command line) and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from zmesh.config import COMMAND_LINE, ConfigError, load_config, parse_seed


def a_key_with(char: str) -> str:
    """A real z85 public key that contains ``char`` (z85 has '@' and ':' in its alphabet)."""
    for n in range(1 << 16):
        key = z85.encode(n.to_bytes(32, "big")[::-1]).decode()
        if char in key:
            return key
    raise AssertionError(f"no key with {char!r}")


def test_a_bare_address_has_no_key() -> None:
    assert parse_seed("10.0.0.2:7101") == (None, "10.0.0.2", 7101)
    assert parse_seed("[fd00::3]:7101") == (None, "fd00::3", 7101)


def test_a_key_before_the_last_at_sign_is_the_seeds_key() -> None:
    key = zmq.curve_keypair()[0].decode()
    assert parse_seed(f"{key}@beta.mesh.svc:7101") == (key, "beta.mesh.svc", 7101)
    assert parse_seed(f"{key}@[fd00::3]:7101") == (key, "fd00::3", 7101)


@pytest.mark.parametrize("char", ["@", ":"])
def test_a_key_holding_z85s_at_sign_or_colon_still_splits_right(char: str) -> None:
    key = a_key_with(char)
    assert parse_seed(f"{key}@127.0.0.1:7100") == (key, "127.0.0.1", 7100)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("abc", "got 3 characters, not 40"),
        ("", "got 0 characters, not 40"),
        ("a" * 39 + " ", "characters that z85 does not use"),
        ("%" * 40, "characters 1-5 are not z85 (over 32 bits)"),  # 85^5 - 1 > 2^32
    ],
)
def test_a_malformed_key_in_a_file_names_file_key_and_item(tmp_path: Path, key: str, fragment: str) -> None:
    path = tmp_path / "node.toml"
    good = zmq.curve_keypair()[0].decode()
    path.write_text(f'[node]\nname = "a"\n[mesh]\npeers = [{good + "@h:1"!r}, {key + "@h:2"!r}]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "mesh.peers")
    assert "item 1" in str(info.value) and fragment in str(info.value), str(info.value)
    assert "40-character z85 CURVE public key" in str(info.value)


def test_a_malformed_key_on_the_command_line_names_the_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"node.name": "a", "mesh.peers": ["h:1", "short@h:2"]})
    assert (info.value.file, info.value.key) == (COMMAND_LINE, "mesh.peers")
    assert "item 1" in str(info.value) and "'short@h:2'" in str(info.value)


def test_keyed_and_bare_seeds_load_side_by_side_and_remember_where_they_came_from(tmp_path: Path) -> None:
    key = zmq.curve_keypair()[0].decode()
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nname = "a"\n[mesh]\npeers = ["h:1", {key + "@h:2"!r}]\n')
    from_file = load_config(path)
    assert from_file.mesh.peers == ("h:1", f"{key}@h:2")
    assert from_file.origins["mesh.peers"] == str(path)
    overridden = load_config(path, {"mesh.peers": f"{key}@h:3, h:4"})  # --peer over the file
    assert overridden.mesh.peers == (f"{key}@h:3", "h:4")
    assert overridden.origins["mesh.peers"] == COMMAND_LINE
    assert overridden.origins["node.name"] == str(path)
