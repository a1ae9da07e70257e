"""The `zmesh` command line against a real two-node mesh."""

from __future__ import annotations

import json
import re
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    NodeProcess,
    Subscriber,
    load_keys,
    make_certs,
    publish_until_exit,
    start_mesh,
    stop_all,
    zmesh_cli,
    zmesh_popen,
)

pytestmark = pytest.mark.timeout(90)


class Pair:
    def __init__(self, a: NodeProcess, b: NodeProcess, certs: Path) -> None:
        self.a, self.b, self.certs = a, b, certs


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("cli")
    certs = make_certs(workdir / "certs", ["a", "b"])
    started: list[NodeProcess] = []
    try:
        start_mesh(workdir, certs, ["a", "b"], started)
        yield Pair(*started, certs)
    finally:
        stop_all(started)


def prefix() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def test_zmesh_pub_and_sub_round_trip_across_the_mesh(pair: Pair) -> None:
    p = prefix()
    sub = zmesh_popen("sub", "-h", "127.0.0.1", "-p", str(pair.b.mqtt_port), "-t", f"{p}/#",
                      "-q", "1", "-v", "-C", "1")
    sent: list[str] = []

    def publish(attempt: int) -> None:
        sent.append(f"hello {attempt}")
        result = zmesh_cli("pub", "-h", "127.0.0.1", "-p", str(pair.a.mqtt_port), "-t", f"{p}/greeting",
                           "-m", sent[-1], "-q", "1")
        assert result.returncode == 0, result.stderr

    out, err = publish_until_exit(sub, publish, timeout=30, interval=0.5)
    assert sub.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # -C 1
    assert lines[0] in {f"{p}/greeting {m}" for m in sent}


def test_zmesh_sub_W_exits_27_when_nothing_arrives(pair: Pair) -> None:
    started = time.monotonic()
    result = zmesh_cli("sub", "-p", str(pair.a.mqtt_port), "-t", f"{prefix()}/nothing", "-W", "1")
    took = time.monotonic() - started
    assert result.returncode == 27, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert 1 <= took < 10


def test_dash_h_is_the_host_and_help_is_dash_dash_help(pair: Pair) -> None:
    p = prefix()
    with Subscriber(pair.a.mqtt_port, f"{p}/#") as sub:
        result = zmesh_cli("pub", "-h", "127.0.0.1", "-p", str(pair.a.mqtt_port), "-t", f"{p}/h", "-m", "via -h")
        assert result.returncode == 0, result.stderr
        assert sub.get().payload == b"via -h"
    # The host really is taken from -h: a name that does not resolve fails to connect.
    result = zmesh_cli("pub", "-h", "no-such-host.invalid", "-p", str(pair.a.mqtt_port), "-t", "x", "-m", "y")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stderr.strip()
    usage = zmesh_cli("--help")
    assert usage.returncode == 0 and "Usage" in usage.stdout
    assert "--host" in re.sub(r"\s+", " ", zmesh_cli("pub", "--help").stdout)


def test_zmesh_peers_prints_peer_names_and_up(pair: Pair) -> None:
    result = zmesh_cli("peers", "-h", "127.0.0.1", "-p", str(pair.a.mqtt_port))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    assert ["b", "up"] in [row[:2] for row in rows], result.stdout
    b_key = load_keys(pair.certs / "b.key")[0].decode()
    assert b_key in result.stdout
    as_json = zmesh_cli("peers", "-p", str(pair.a.mqtt_port), "--json")
    assert {(p["name"], p["state"]) for p in json.loads(as_json.stdout)} >= {("b", "up")}


def test_zmesh_certs_create_and_list(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    result = zmesh_cli("certs", "create", "alice", "--dir", str(keys))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((keys / "alice.key_secret").stat().st_mode) == 0o600
    public, secret = load_keys(keys / "alice.key_secret")
    assert secret is not None
    listed = zmesh_cli("certs", "list", "--dir", str(keys))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["alice", public.decode(), "secret"]
    assert secret.decode() not in listed.stdout
    again = zmesh_cli("certs", "create", "alice", "--dir", str(keys))
    assert again.returncode != 0 and "already exists" in again.stderr
    assert load_keys(keys / "alice.key_secret")[1] == secret  # not overwritten


def test_node_run_with_an_unknown_config_key_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nname = "x"\n\n[mesh]\npeer_expiri = 1.0\n')
    result = zmesh_cli("node", "run", "--config", str(bad))
    assert result.returncode == 2, result.stderr
    assert str(bad) in result.stderr and "mesh.peer_expiri" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_zmesh_demo_shows_the_late_subscriber_getting_the_retained_value() -> None:
    result = zmesh_cli("demo", "--duration", "2", timeout=45)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"late subscriber on \w+ got config/threshold = 90 \(retained\)", result.stdout), result.stdout
    assert "Traceback" not in result.stdout + result.stderr
