"""Users and ACLs on a real node process and through the CLI: a broken file stops the node
at start with file:line; SIGHUP / `zmesh node reload` swap in fixed files and keep the old
rules for broken ones while clients stay connected; `zmesh acl check` and its exit codes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, make_certs, wait_until, zmesh_cli
from tests.mosquitto_broker import Client
from zmesh.security import hash_password

ACL = "user alice\ntopic readwrite a/#\npattern read devices/%u/#\n"


def node_config(tmp_path: Path, acl: str = ACL) -> Path:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{hash_password(b'a1')}\n")
    passwd.chmod(0o600)
    (tmp_path / "acl").write_text(acl)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nname = "a"\ndata_dir = "{tmp_path / "data"}"\n'
        '[mqtt]\npassword_file = "passwd"\nacl_file = "acl"\nallow_anonymous = true\n'
    )
    return config


def test_a_broken_acl_file_stops_the_node_naming_file_and_line(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    config = node_config(tmp_path, "user alice\ntopic read a/#\ntopic raed b\n")
    result = zmesh_cli("node", "run", "--config", str(config), "--cert", str(certs / "a.key_secret"),
                       "--listen", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", timeout=30)
    assert result.returncode != 0
    assert f"{tmp_path / 'acl'}:3: invalid access 'raed'" in result.stderr, result.stderr


def test_a_broken_password_file_stops_the_node_without_showing_the_secret(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    config = node_config(tmp_path)
    (tmp_path / "passwd").write_text("# users\nalice:hunter2\n")
    result = zmesh_cli("node", "run", "--config", str(config), "--cert", str(certs / "a.key_secret"),
                       "--listen", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", timeout=30)
    assert result.returncode != 0
    assert f"{tmp_path / 'passwd'}:2: user 'alice': the password is not hashed" in result.stderr, result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_reload_keeps_old_rules_for_broken_files_and_clients_stay_connected(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    config = node_config(tmp_path)
    node = NodeProcess(tmp_path, "a", certs, extra=["--config", str(config)])
    nodes.append(node)
    pid_file = tmp_path / "data" / "zmesh.pid"
    wait_until(pid_file.exists, 10, "the pid file")
    assert pid_file.read_text().strip() == str(node.process.pid)

    sub = Client(node.mqtt_port, "alice", "a1", "alice-sub")
    assert not sub.connect().is_failure
    assert [c.value for c in sub.subscribe("a/#")] == [0]
    try:
        # A broken ACL file: `node reload --config` checks first and sends nothing...
        (tmp_path / "acl").write_text(ACL + "topic\n")
        result = zmesh_cli("node", "reload", "--config", str(config))
        assert result.returncode == 2
        assert f"{tmp_path / 'acl'}:4: empty topic after 'topic'" in result.stderr
        assert "not reloading" in result.stderr
        # ...and a SIGHUP anyway makes the node say why it keeps the old rules.
        result = zmesh_cli("node", "reload", "--pid", str(node.process.pid))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "reload refused, keeping the old users and ACLs" in node.output(), 10, "the refusal")
        assert f"{tmp_path / 'acl'}:4: empty topic" in node.output()

        (tmp_path / "acl").write_text(ACL + "topic read b/#\n")
        result = zmesh_cli("node", "reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert f"sent SIGHUP to node a (pid {node.process.pid})" in result.stdout
        wait_until(lambda: "users and ACLs reloaded" in node.output(), 10, "the reload")
        assert "(generation 1)" in node.output()

        # The subscriber connected before both reloads is still connected and served.
        assert sub.client.is_connected()
        publisher = Client(node.mqtt_port, "alice", "a1", "alice-pub")
        assert not publisher.connect().is_failure
        publisher.publish("a/after-reload", b"x")
        publisher.close()
        message = sub.messages.get(timeout=10)
        assert (message.topic, message.payload) == ("a/after-reload", b"x")
    finally:
        sub.close()
    node.stop()
    assert not pid_file.exists()


def test_node_reload_refuses_a_missing_or_stale_pid_file(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    (tmp_path / "data").mkdir()
    result = zmesh_cli("node", "reload", "--config", str(config))
    assert result.returncode == 1 and "is node a running?" in result.stderr
    # A pid file naming a live process that is not a zmesh node: nothing is signalled.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "data" / "zmesh.pid").write_text(f"{sleeper.pid}\n")
        result = zmesh_cli("node", "reload", "--config", str(config))
        assert result.returncode == 1 and "not a running zmesh node" in result.stderr
        assert sleeper.poll() is None  # SIGHUP would have killed sleep
    finally:
        sleeper.kill()
        sleeper.wait(5)


# ---------------------------------------------------------------------------- zmesh acl check


@pytest.mark.parametrize(
    "args, code, output",
    [
        (["alice", "a/b", "write"], 0, "allowed: allowed by `topic readwrite a/#` at {acl}:2"),
        (["alice", "devices/alice/t", "read"], 0, "allowed: allowed by `pattern read devices/%u/#` at {acl}:3"),
        (["bob", "devices/alice/t", "read"], 1, "denied: no rule grants read on 'devices/alice/t' to user 'bob'"),
        (["-", "a/b", "read"], 1, "denied: no rule grants read on 'a/b' to anonymous clients"),
        (["--anonymous", "a/b", "read"], 1, "denied: no rule grants read on 'a/b' to anonymous clients"),
        (["bob", "a/b", "subscribe"], 0, "allowed: Mosquitto 2.0 grants every SUBSCRIBE"),
        (["bob", "a/b", "publish"], 2, "access must be read, write or subscribe"),
    ],
)
def test_acl_check(tmp_path: Path, args: list[str], code: int, output: str) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\npattern read devices/%u/#\n")
    result = zmesh_cli("acl", "check", *args, "--acl-file", str(acl))
    assert result.returncode == code, result.stderr
    assert output.format(acl=acl) in result.stdout + result.stderr


def test_acl_check_with_a_config_and_a_bad_file(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    result = zmesh_cli("acl", "check", "alice", "a/x", "read", "--config", str(config))
    assert result.returncode == 0 and f"at {tmp_path / 'acl'}:2" in result.stdout
    (tmp_path / "acl").write_text("topic read a\n\ntopic rw b\n")
    result = zmesh_cli("acl", "check", "alice", "a", "read", "--config", str(config))
    assert result.returncode == 2 and f"{tmp_path / 'acl'}:3: invalid access 'rw'" in result.stderr
    no_acl = tmp_path / "plain.toml"
    no_acl.write_text('[node]\nname = "a"\n')
    result = zmesh_cli("acl", "check", "alice", "a", "write", "--config", str(no_acl))
    assert result.returncode == 0 and "sets no mqtt.acl_file" in result.stdout



# ---------------------------------------------------------------------------- read at delivery


def _retained_seen(client: Client, fence_topic: str) -> list[tuple[str, bytes, bool]]:
    """What ``client`` got until the fence on ``fence_topic`` (a live message behind the
    retained replay, so nothing held back can still be on its way)."""
    seen = []
    while (message := client.messages.get(timeout=10)).topic != fence_topic or message.payload != b"fence":
        seen.append((message.topic, message.payload, bool(message.retain)))
    return seen


def test_retained_replay_and_live_delivery_follow_the_read_acl_including_after_a_reload(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    config = node_config(tmp_path, "user alice\ntopic readwrite a/#\nuser bob\ntopic read a/public\n")
    (tmp_path / "passwd").write_text(f"alice:{hash_password(b'a1')}\nbob:{hash_password(b'b1')}\n")
    node = NodeProcess(tmp_path, "a", certs, extra=["--config", str(config)])
    nodes.append(node)
    alice = Client(node.mqtt_port, "alice", "a1")
    bob = Client(node.mqtt_port, "bob", "b1")
    late = Client(node.mqtt_port, "bob", "b1")
    try:
        assert not alice.connect().is_failure
        alice.publish("a/public", b"p", retain=True)
        alice.publish("a/secret", b"s", retain=True)

        assert not bob.connect().is_failure
        bob.subscribe("a/#")  # Mosquitto grants it; every message is checked for read
        alice.publish("a/public", b"fence")
        assert _retained_seen(bob, "a/public") == [("a/public", b"p", True)]

        (tmp_path / "acl").write_text("user alice\ntopic readwrite a/#\nuser bob\ntopic read a/#\n")
        assert zmesh_cli("node", "reload", "--config", str(config)).returncode == 0
        wait_until(lambda: "users and ACLs reloaded" in node.output(), 10, "the reload")

        # The connected client's live delivery follows the new rules...
        alice.publish("a/secret", b"live")
        message = bob.messages.get(timeout=10)
        assert (message.topic, message.payload) == ("a/secret", b"live")
        # ...and so does retained replay: a new subscription now gets both values.
        assert not late.connect().is_failure
        late.subscribe("a/#")
        alice.publish("a/public", b"fence")
        assert sorted(_retained_seen(late, "a/public")) == [("a/public", b"p", True), ("a/secret", b"s", True)]
    finally:
        for client in (alice, bob, late):
            client.close()
